"""Rollouts end to end: a real gateway (its rollout driver) and mosquitto, and three simulated boxes that take
signed commands with their own credentials, verify them with the real ``CommandVerifier``, and answer with real
signed envelopes carrying OTA events, as the box's updater does."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fleet_fixtures import utcnow, wait_until
from gateway_helpers import SimDevice, gateway_config

from edge.errors import ConfigError, TransportError
from edge.fleet.config import RolloutConfig, parse_gateway_config
from edge.fleet.gateway import Gateway
from edge.fleet.pki.ca import FleetCA
from edge.fleet.rollout.driver import RolloutDriver, RolloutFiles, abort_rollout, start_rollout
from edge.fleet.rollout.planner import Rollout, RolloutConflictError, order_devices
from edge.fleet.store import open_store
from edge.wire.commands import Command as SignedCommand
from edge.wire.commands import CommandVerifier, NonceSet
from edge.wire.envelope import envelope_hash, seal_envelope
from edge.wire.schema import EventRecord

RID = "5eed0001"
# name, version -> what a box's updater concludes after the trial
Behaviour = Callable[[str, str], str | None]


class SimBox:
    """A box's command side: subscribes to its commands, verifies them, and reports OTA events in signed telemetry."""

    def __init__(self, broker, pki, device: SimDevice, fleet_key, behaviour: Behaviour) -> None:
        self.dev = device
        self.behaviour = behaviour
        self.verifier = CommandVerifier(fleet_key, device.id, seen=NonceSet())
        self.commands: list[SignedCommand] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        creds = pki.client(device.id, key=device.key)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"box-{device.id}", protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
        subscribed = threading.Event()
        c.on_connect = lambda cl, *_a: cl.subscribe(f"devices/{device.id}/commands", qos=1)
        c.on_subscribe = lambda *_a: subscribed.set()
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert subscribed.wait(10), f"{device.id} could not subscribe"
        self.client = c

    def received(self, name: str | None = None) -> list[SignedCommand]:
        with self._lock:
            return [c for c in self.commands if name is None or c.name == name]

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        try:
            cmd = self.verifier.verify(msg.payload, time.time())
        except Exception as e:  # recorded: the test asserts there were none
            self.rejected.append(repr(e))
            return
        with self._lock:
            self.commands.append(cmd)
        a = cmd.args
        base = {"model": a["name"], "from": "digits@1.0.0", "slot": "b", "rollout": a["rollout"]}
        if cmd.name == "models/update":
            outcome = self.behaviour(str(a["name"]), str(a["version"]))
            if outcome is None:
                return  # a box that never answers
            now = time.time()
            events = [EventRecord(now, f"ota.{s}", {**base, "version": a["version"], "reason": None})
                      for s in ("downloading", "verifying", "staged", "trial")]  # fmt: skip
            extra = {"variant": "int8", "latency_ms": 2.5} if outcome == "committed" else {}
            reason = None if outcome == "committed" else "golden samples out of tolerance"
            events.append(EventRecord(now, f"ota.{outcome}", {**base, "version": a["version"], "reason": reason,
                                                              **extra}))  # fmt: skip
        else:
            events = [EventRecord(time.time(), "ota.reverted", {**base, "version": a["version"], "reason": "fleet"})]
        self._publish(events)

    def _publish(self, events: list[EventRecord]) -> None:
        d = self.dev
        d.counter += 1
        data = seal_envelope(d.id, d.counter, d.prev, events, time.time(), d.key)
        d.prev = envelope_hash(data)
        self.client.publish(f"devices/{d.id}/telemetry", data, qos=1)  # not waited for: this is paho's thread

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    d.mkdir()
    FleetCA.init(d, now=utcnow())  # the fleet command key the gateway signs with
    return d


def enroll(store_url: str, devices: list[SimDevice]) -> None:
    store = open_store(store_url)
    try:
        for d in devices:
            store.add_device(d.record())
            store.record_status(d.id, {"state": "online", "model": "digits@1.0.0"}, time.time())
    finally:
        store.close()


@pytest.fixture
def fleet(broker, pki, fleet_dir: Path) -> Iterator[Callable[..., tuple[Gateway, list[SimBox]]]]:
    """``fleet(behaviour, timeout)``: an enrolled fleet of 3 boxes and a running gateway driving its rollouts."""
    made: list[tuple[Gateway, list[SimBox]]] = []
    url = f"sqlite:///{fleet_dir / 'fleet.db'}"

    def make(behaviour: Behaviour, device_timeout_s: float = 900.0) -> tuple[Gateway, list[SimBox]]:
        devices = [SimDevice(f"box-{i}") for i in range(3)]
        enroll(url, devices)
        cfg = gateway_config(broker, pki, fleet_dir, url)
        cfg = dataclasses.replace(cfg, rollout=RolloutConfig(interval_s=0.1, device_timeout_s=device_timeout_s))
        gw = Gateway(cfg)
        gw.start()
        assert gw.transport.wait_connected(10)
        key = FleetCA.load(fleet_dir).commands_public
        boxes = [SimBox(broker, pki, d, key, behaviour) for d in devices]
        made.append((gw, boxes))
        return gw, boxes

    yield make
    for gw, boxes in made:
        for b in boxes:
            b.close()
        gw.stop()


def start(fleet_dir: Path, version: str, stages: tuple[float, ...] = (0.1, 0.5, 1.0)) -> Rollout:
    store = open_store(f"sqlite:///{fleet_dir / 'fleet.db'}")
    try:
        return start_rollout(fleet_dir, store, "digits", version, stages, now=time.time(), rollout_id=RID)
    finally:
        store.close()


def current(fleet_dir: Path) -> Rollout:
    r = RolloutFiles(fleet_dir).current()
    assert r is not None
    return r


def test_good_version_is_committed_everywhere_stage_by_stage(fleet, fleet_dir) -> None:
    gw, boxes = fleet(lambda _n, _v: "committed")
    start(fleet_dir, "2.0.0")
    assert wait_until(lambda: current(fleet_dir).state == "completed", 20)
    r = current(fleet_dir)
    assert [d.outcome for d in r.devices] == ["committed"] * 3 and r.finished_at is not None
    # Each stage was commanded only after the one before it had committed.
    commanded = [d.commanded_at for d in r.devices]
    outcome_at = [d.outcome_at for d in r.devices]
    assert commanded[1] >= outcome_at[0] and commanded[2] >= max(outcome_at[:2])  # type: ignore[operator]
    for b in boxes:
        (cmd,) = b.received()  # exactly one command, no re-sends
        assert cmd.name == "models/update" and dict(cmd.args) == {
            "name": "digits", "version": "2.0.0", "rollout": RID, "force": False
        }  # fmt: skip
        assert b.rejected == []
    # The driver counts the completion just after it writes the rollout file: wait for the count, not just the file.
    completed = 'edge_gateway_rollouts_total{state="completed"} 1.0'
    assert wait_until(lambda: completed in gw.metrics.exposition().decode(), 5)
    text = gw.metrics.exposition().decode()
    assert 'edge_gateway_rollout_commands_total{command="models/update",result="sent"} 3.0' in text
    store = open_store(f"sqlite:///{fleet_dir / 'fleet.db'}")
    try:
        assert len(store.events(kind_prefix="ota.committed")) == 3  # the reports are in the store
    finally:
        store.close()


def test_broken_version_aborts_at_the_first_stage_and_nobody_else_is_commanded(fleet, fleet_dir) -> None:
    _gw, boxes = fleet(lambda _n, _v: "rolled_back")
    start(fleet_dir, "3.0.0")
    assert wait_until(lambda: current(fleet_dir).finished_at is not None, 20)
    r = current(fleet_dir)
    assert r.state == "aborted" and r.stage == 0 and r.reason is not None and r.reason.startswith("threshold")
    first = r.devices[0].device_id
    assert r.devices[0].outcome == "failed" and "golden" in (r.devices[0].reason or "")
    time.sleep(0.5)  # several more driver ticks: still nobody else is commanded
    got = {b.dev.id: [c.name for c in b.received()] for b in boxes}
    assert got == {b.dev.id: (["models/update"] if b.dev.id == first else []) for b in boxes}
    with pytest.raises(RolloutConflictError):
        abort_rollout(fleet_dir)  # already aborted


def test_operator_abort_rolls_back_only_the_committed_devices(fleet, fleet_dir) -> None:
    last = order_devices(RID, [f"box-{i}" for i in range(3)])[-1]
    _gw, boxes = fleet(lambda _n, _v: "committed")
    silent = next(b for b in boxes if b.dev.id == last)
    silent.behaviour = lambda _n, _v: None  # this box never answers: the second stage stays open
    start(fleet_dir, "2.0.0", stages=(0.5, 1.0))
    assert wait_until(lambda: len(silent.received("models/update")) == 1, 20)
    with pytest.raises(RolloutConflictError, match="still running"):
        start(fleet_dir, "2.0.0")
    aborted = abort_rollout(fleet_dir)
    assert aborted.reason == "operator"
    committed = [b for b in boxes if b is not silent]
    assert wait_until(lambda: all(b.received("models/rollback") for b in committed), 20)
    for b in committed:
        (rb,) = b.received("models/rollback")
        assert dict(rb.args) == {"name": "digits", "version": "2.0.0", "rollout": RID}
    assert silent.received("models/rollback") == []
    # The broker's acknowledgement is recorded after the box may already have the command.
    assert wait_until(lambda: all(d.rollback_sent_at for d in current(fleet_dir).devices if d.outcome), 10)
    r = current(fleet_dir)
    assert r.state == "aborted" and {d.device_id: d.outcome for d in r.devices} == {
        b.dev.id: (None if b is silent else "committed") for b in boxes
    }
    body = json.loads(r.encode())
    assert body["state"] == "aborted"


def test_a_driver_skips_its_tick_while_another_holds_the_lock(fleet_dir) -> None:
    enroll(f"sqlite:///{fleet_dir / 'fleet.db'}", [SimDevice("box-0")])
    start(fleet_dir, "2.0.0")
    sent: list[str] = []

    def publish(topic: str, _payload: bytes):
        sent.append(topic)
        raise TransportError("not connected")  # the broker is away: the command stays unconfirmed

    driver = RolloutDriver(fleet_dir, lambda: open_store(f"sqlite:///{fleet_dir / 'fleet.db'}"), publish,
                           lambda: FleetCA.load(fleet_dir).commands_key)  # fmt: skip
    try:
        with RolloutFiles(fleet_dir).lock() as held:
            assert held
            assert driver.tick() is None and sent == []  # another process holds the lock: skip
        r = driver.tick()
        assert r is not None and r.devices[0].commanded_at is not None and r.devices[0].sent_at is None
        assert current(fleet_dir) == r  # persisted, the failed publish included
        driver.tick()
        assert sent == ["devices/box-0/commands"] * 2  # not confirmed: sent again on the next tick
    finally:
        driver.stop()


def test_rollout_config_section_defaults_and_validation() -> None:
    assert parse_gateway_config({}).rollout == RolloutConfig(True, 2.0, 900.0, 900.0)
    cfg = parse_gateway_config({"rollout": {"enabled": False, "interval_s": 0.5, "device_timeout_s": 60,
                                            "command_ttl_s": 300}})  # fmt: skip
    assert cfg.rollout == RolloutConfig(False, 0.5, 60.0, 300.0)
    for key, value in (("interval_s", 0), ("device_timeout_s", "soon"), ("command_ttl_s", 7200), ("speed", 1)):
        with pytest.raises(ConfigError, match=f"rollout.{key}"):
            parse_gateway_config({"rollout": {key: value}})
