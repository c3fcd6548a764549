"""Signed fleet commands to a running box: `edge run` in a subprocess with a provisioned fleet key, a real mosquitto
(TLS, client certificates, ACLs), and the test as the gateway identity signing commands with the fleet CA's command
key. Every reply is matched to its command; rejected commands never stop the service, and the counts it reports on
exit equal the rejections the gateway saw."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_broker import GATEWAY_ID, Broker

from edge.config import parse_config
from edge.errors import ConfigError
from edge.fleet.pki.ca import FleetCA
from edge.identity.keys import generate_device_identity, load_private_key
from edge.ota.clock import TimeFloor
from edge.telemetry.control import CommandExecutor, DeviceControls
from edge.telemetry.device import DeviceTelemetry
from edge.telemetry.outbox import Outbox
from edge.telemetry.sink import TelemetrySink
from edge.wire.commands import Command, CommandRejected, sign_command
from edge.wire.envelope import open_envelope
from edge.wire.records import ReadingRecord
from edge.wire.schema import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "box-1"
YEAR = 365 * 86400.0


class Gateway:
    """The test's gateway: subscribes to the box's replies, status and telemetry; publishes signed commands."""

    def __init__(self, broker: Broker, pki, device_id: str = DEVICE) -> None:
        self.device_id = device_id
        creds = pki.client(GATEWAY_ID)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-gw-{device_id}", protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key))
        self.lock = threading.Lock()
        self.by_topic: dict[str, list[bytes]] = {}
        subscribed = threading.Event()
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: subscribed.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.subscribe(f"devices/{device_id}/#", qos=1)
        assert subscribed.wait(5)
        self.client = c
        self.error_replies: Counter[str] = Counter()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.by_topic.setdefault(msg.topic.rsplit("/", 1)[1], []).append(bytes(msg.payload))

    def messages(self, kind: str) -> list[bytes]:
        with self.lock:
            return list(self.by_topic.get(kind, []))

    def wait(self, kind: str, count: int, timeout: float = 15) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages(kind)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{count} {kind} messages expected within {timeout} s, got {len(self.messages(kind))}")

    def send(self, data: bytes, topic_device: str | None = None) -> dict:
        """Publish one command message and return the reply it caused (replies come one per message, in order)."""
        before = len(self.messages("replies"))
        info = self.client.publish(f"devices/{topic_device or self.device_id}/commands", data, qos=1)
        info.wait_for_publish(5)
        reply = json.loads(self.wait("replies", before + 1)[before])
        if not reply["ok"]:
            self.error_replies[reply["error"]] += 1
        return reply

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def provision(data: Path, pki, fleet: FleetCA | None, device_id: str = DEVICE) -> Ed25519PrivateKey:
    """The box's key (as `edge keys generate` makes it), its certificate, the fleet CA and the fleet command key."""
    keys = data / "keys"
    generate_device_identity(keys, device_id)
    key = load_private_key(keys / "device.key")
    creds = pki.client(device_id, key=key)
    shutil.copy(creds.cert, keys / "device.pem")
    shutil.copy(creds.ca, keys / "fleet-ca.pem")
    if fleet is not None:
        (keys / "fleet-commands.pub").write_bytes(fleet.commands_public_pem)
    return key


def device_toml(data: Path, broker: Broker, *, batch_records: int) -> str:
    return f"""
[device]
id = "{DEVICE}"
data_dir = "{data}"
[source]
kind = "synthetic"
fps = 50
[sink]
kind = "telemetry"
[telemetry]
host = "{broker.host}"
port = {broker.port}
batch_records = {batch_records}
batch_age_s = 30
keepalive_s = 5
[log]
level = "info"
"""


class Box:
    """`edge run` with its stderr (JSON logs) in a file."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.log = log
        self._err = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "run", "--config", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def rig(tmp_path_factory, pki):
    """One broker, one fleet CA, one running box and the gateway for every test of this module (starting a box
    costs seconds; each test matches its own replies)."""
    tmp = tmp_path_factory.mktemp("device-commands")
    broker = Broker(tmp / "broker", pki)
    broker.start()
    fleet = FleetCA.init(tmp / "fleet")
    data = tmp / "data"
    device_key = provision(data, pki, fleet)
    cfg = tmp / "edge.toml"
    cfg.write_text(device_toml(data, broker, batch_records=50))
    gateway = Gateway(broker, pki)
    box = Box(cfg, tmp / "box.log")
    try:
        gateway.wait("status", 1, timeout=60)  # the birth message: the box is connected and subscribed
        yield {"broker": broker, "fleet": fleet, "gateway": gateway, "box": box, "device_key": device_key}
    finally:
        box.stop()
        gateway.close()
        broker.stop()


def signed(rig, name: str, args: dict | None = None, **kw) -> bytes:
    kw.setdefault("now", time.time())
    return sign_command(rig["fleet"].commands_key, kw.pop("device", DEVICE), name, args or {}, **kw)


def test_ping_gets_a_pong(rig) -> None:
    data = signed(rig, "ping")
    reply = rig["gateway"].send(data)
    nonce = cbor2.loads(cbor2.loads(data).value[2])[5].hex()
    assert reply["ok"] and reply["command"] == "ping" and reply["nonce"] == nonce
    assert reply["result"]["pong"] is True and abs(reply["result"]["ts"] - time.time()) < 30


def test_set_batch_records_changes_the_envelopes_the_box_seals(rig) -> None:
    gw, key = rig["gateway"], rig["device_key"].public_key()

    def sizes() -> list[int]:
        return [len(open_envelope(m, key).records) for m in gw.messages("telemetry")]

    assert gw.wait("telemetry", 2, timeout=30)
    assert set(sizes()) == {50}
    reply = gw.send(signed(rig, "set", {"key": "telemetry.batch_records", "value": 7}))
    assert reply["ok"], reply
    assert reply["result"] == {"key": "telemetry.batch_records", "value": 7}
    mark = len(gw.messages("telemetry"))
    gw.wait("telemetry", mark + 4, timeout=30)
    after = sizes()[mark:]
    # The batch waiting at the change may be sealed at once with what it had; every later one has exactly 7.
    assert after[1:] and set(after[1:]) == {7}, after


def test_set_of_a_bad_value_or_a_key_that_is_not_live_is_refused(rig) -> None:
    gw = rig["gateway"]
    bad = gw.send(signed(rig, "set", {"key": "telemetry.batch_records", "value": 0}))
    assert not bad["ok"] and bad["error"] == "invalid_argument" and "integer >= 1" in bad["detail"]
    not_live = gw.send(signed(rig, "set", {"key": "telemetry.host", "value": "evil.example"}))
    assert not_live["error"] == "not_live" and not_live["command"] == "set"
    unknown = gw.send(signed(rig, "set", {"key": "telemetry.nope", "value": 1}))
    assert unknown["error"] == "unknown_key"
    level = gw.send(signed(rig, "set", {"key": "log.level", "value": "debug"}))
    assert level["ok"] and level["result"]["value"] == "debug"


def test_status_request_republishes_the_status(rig) -> None:
    gw = rig["gateway"]
    before = len(gw.messages("status"))
    reply = gw.send(signed(rig, "status"))
    assert reply["ok"], reply
    status = json.loads(gw.wait("status", before + 1)[before])
    assert status["state"] == "online" and status["device"] == DEVICE
    assert isinstance(status["outbox_backlog"], int)
    assert reply["result"] == status  # the reply carries what was published


def test_replayed_command_rejected(rig) -> None:
    gw = rig["gateway"]
    data = signed(rig, "ping")
    assert gw.send(data)["ok"]
    again = gw.send(data)  # the very same bytes, e.g. captured and republished
    assert not again["ok"] and again["error"] == "replayed" and again["command"] == "ping"


def test_far_future_command_does_not_lock_the_box_out_of_the_next_correct_one(rig) -> None:
    # A fleet whose clock jumped ten years ahead signs one command; the fleet's next command, at the right time, must
    # still run (before the horizon rule the box's floor jumped with it and every later command was "expired").
    gw = rig["gateway"]
    far = gw.send(signed(rig, "ping", now=time.time() + 10 * YEAR))
    assert far["ok"], far
    correct = gw.send(signed(rig, "ping"))
    assert correct["ok"], correct
    status = gw.send(signed(rig, "status"))["result"]
    assert status["time"]["command_floor"] <= time.time()  # the far-future issued-at did not move the floor ahead
    assert status["time"]["command_not_before"] == 0.0 and status["time"]["ota_floor"] is None


def test_expired_command_rejected(rig) -> None:
    reply = rig["gateway"].send(signed(rig, "ping", now=time.time() - 120, ttl_s=60))
    assert reply["error"] == "expired"


def test_unsigned_command_rejected(rig) -> None:
    gw = rig["gateway"]
    good = cbor2.loads(signed(rig, "ping"))
    stripped = cbor2.dumps(cbor2.CBORTag(18, [good.value[0], {}, good.value[2], b""]))
    reply = gw.send(stripped)
    assert reply == {"ok": False, "error": "unsigned", "detail": "COSE_Sign1 without a signature"}


def test_command_for_another_device_rejected(rig) -> None:
    reply = rig["gateway"].send(signed(rig, "ping", device="box-2"))
    assert reply["error"] == "wrong_device"


def test_forged_command_rejected(rig) -> None:
    forged = sign_command(Ed25519PrivateKey.generate(), DEVICE, "set", {"key": "log.level", "value": "error"}, now=0)
    assert rig["gateway"].send(forged)["error"] == "bad_signature"


def test_garbage_and_unknown_commands_rejected(rig) -> None:
    gw = rig["gateway"]
    assert gw.send(b"\x00garbage")["error"] == "malformed"
    assert gw.send(signed(rig, "reboot"))["error"] == "unknown_command"


def test_fleet_command_cli_signs_sends_and_prints_the_reply(rig, pki, tmp_path) -> None:
    """`edge fleet command` as an operator runs it: the gateway's configuration, the fleet's command key."""
    creds = pki.client(GATEWAY_ID)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'[gateway]\nfleet_dir = "{rig["fleet"].directory}"\n'
        f'[broker]\nhost = "{rig["broker"].host}"\nport = {rig["broker"].port}\n'
        f'ca = "{creds.ca}"\ncert = "{creds.cert}"\nkey = "{creds.key}"\n'
    )
    # `edge fleet command` connects as an operator identity (<fleet dir>/operator/NAME.pem), never as the gateway.
    # This module's broker grants the fleet's topics to "gateway" only, so that is the operator's name here.
    operator = rig["fleet"].directory / "operator"
    operator.mkdir(exist_ok=True)
    shutil.copy(creds.cert, operator / f"{GATEWAY_ID}.pem")
    shutil.copy(creds.key, operator / f"{GATEWAY_ID}.key")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge", "fleet", "command", "--config", str(cfg), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
            env={**os.environ, "EDGE_FLEET_OPERATOR": GATEWAY_ID},
        )

    proc = cli(DEVICE, "ping")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] and reply["command"] == "ping" and reply["result"]["pong"] is True
    proc = cli(DEVICE, "set", "key=telemetry.batch_age_s", "value=0.5")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"]
    proc = cli(DEVICE, "set", "key=device.id", "value=other")  # not a live setting: refused by the box
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"] == "not_live"
    rig["gateway"].error_replies["not_live"] += 1  # the box's own tally (checked last) includes this refusal
    proc = cli("box-absent", "ping", "--wait", "2")  # nobody subscribed to that device's commands
    assert proc.returncode == 1 and "not subscribed" in proc.stderr


def test_box_keeps_running_and_counts_every_rejection(rig) -> None:
    # Runs last: the box survived every command above, still publishes, and stops cleanly with the counts.
    gw, box = rig["gateway"], rig["box"]
    seen = len(gw.messages("telemetry"))
    gw.wait("telemetry", seen + 2, timeout=30)
    assert box.proc.poll() is None
    assert box.stop() == 0
    stopped = next(e for e in box.logs() if e["msg"] == "service stopped")
    assert stopped["commands_rejected"] == dict(gw.error_replies)
    assert stopped["commands_executed"].get("ping", 0) >= 1
    logged = Counter(e["reason"] for e in box.logs() if e["msg"] == "command rejected")
    assert logged == gw.error_replies


def test_box_without_fleet_key_rejects_commands_and_keeps_publishing(tmp_path, pki, broker) -> None:
    # The in-process DeviceTelemetry, provisioned without fleet-commands.pub.
    data = tmp_path / "data"
    key = provision(data, pki, fleet=None)
    cfg = parse_config(
        {
            "device": {"id": DEVICE, "data_dir": str(data)},
            "sink": {"kind": "telemetry"},
            "telemetry": {"host": broker.host, "port": broker.port, "batch_records": 1},
        }
    )
    telemetry = DeviceTelemetry(cfg, model_id="m@1", model_sha256="0" * 64, backend="numpy")
    gw = Gateway(broker, pki)
    try:
        telemetry.start()
        gw.wait("status", 1)
        fleet = FleetCA.init(tmp_path / "fleet", now=datetime.datetime.now(datetime.UTC))
        reply = gw.send(sign_command(fleet.commands_key, DEVICE, "ping", {}, now=time.time()))
        assert reply["error"] == "unsigned" and "no fleet key provisioned" in reply["detail"]
        telemetry.sink.write([ReadingRecord(channel=1, value=2.5, timestamp=time.time())])
        envelope = open_envelope(gw.wait("telemetry", 1)[0], key.public_key())
        assert envelope.records == (ReadingRecord(channel=1, value=2.5, timestamp=envelope.records[0].timestamp),)
    finally:
        stats = telemetry.close()
        gw.close()
    assert stats["commands_rejected"] == {"unsigned": 1}


def test_live_batching_change_seals_a_batch_it_makes_full(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    outbox = Outbox(tmp_path / "o.sqlite", device_id=DEVICE, key=key, limits=DEFAULT_LIMITS)
    sink = TelemetrySink(outbox, batch_records=100, batch_age_s=60)
    try:
        sink.write([ReadingRecord(channel=i, value=1.0, timestamp=1_790_000_000.0) for i in range(5)])
        assert outbox.stats().backlog_envelopes == 0
        sink.set_batching(3, None)  # 5 waiting >= 3: sealed now, not when the next record comes
        assert outbox.stats().backlog_envelopes == 1 and sink.batching == (3, 60.0)
        with pytest.raises(ConfigError, match=r"telemetry\.batch_age_s"):
            sink.set_batching(2, 0.0)  # one value invalid: neither changes
        assert sink.batching == (3, 60.0)
        sink.write([ReadingRecord(channel=9, value=1.0, timestamp=1_790_000_000.0)] * 3)
        assert [c for c, _ in outbox.pending(0, 10)] == [1, 2]
    finally:
        sink.close()
        outbox.close()


def test_fleet_key_setting() -> None:
    assert parse_config({}).telemetry.fleet_key == Path("keys/fleet-commands.pub")
    assert parse_config({"telemetry": {"fleet_key": ""}}).telemetry.fleet_key is None
    assert parse_config({"telemetry": {"fleet_key": "/etc/edge/k.pub"}}).telemetry.fleet_key == Path("/etc/edge/k.pub")
    with pytest.raises(ConfigError, match=r"telemetry\.fleet_key"):
        parse_config({"telemetry": {"fleet_key": 7}})


def test_corrupt_nonce_file_disables_commands_instead_of_forgetting_nonces(tmp_path, pki, broker) -> None:
    # Resetting a damaged nonce set would reopen the replay window: the box refuses commands and says why.
    data = tmp_path / "data"
    fleet = FleetCA.init(tmp_path / "fleet", now=datetime.datetime.now(datetime.UTC))
    provision(data, pki, fleet)
    (data / "command-nonces.cbor").write_bytes(b"\xbf not a nonce set")
    cfg = parse_config(
        {
            "device": {"id": DEVICE, "data_dir": str(data)},
            "sink": {"kind": "telemetry"},
            "telemetry": {"host": broker.host, "port": broker.port},
        }
    )
    telemetry = DeviceTelemetry(cfg, model_id="m@1", model_sha256="0" * 64, backend="numpy")
    gw = Gateway(broker, pki)
    try:
        telemetry.start()
        gw.wait("status", 1)
        reply = gw.send(sign_command(fleet.commands_key, DEVICE, "ping", {}, now=time.time()))
        assert reply["error"] == "unavailable" and "command nonce file" in reply["detail"]
    finally:
        stats = telemetry.close()
        gw.close()
    assert stats["commands_rejected"] == {"unavailable": 1}
    assert (data / "command-nonces.cbor").read_bytes() == b"\xbf not a nonce set"  # left for an operator to inspect


def test_box_poisoned_before_the_rule_is_recovered_by_time_reset(tmp_path, pki, broker) -> None:
    """A nonce file written before the horizon rule, its floor ten years ahead: every correct command is expired. A
    time/reset issued at the floor the box reports in its status (what `edge fleet command --at-box-floor` does,
    tests/fleet/test_time_reset_cli.py) brings the box back, and a command of the fleet from before the reset whose
    nonce the poisoned floor made the box forget cannot be replayed."""
    data = tmp_path / "data"
    fleet = FleetCA.init(tmp_path / "fleet", now=datetime.datetime.now(datetime.UTC))
    provision(data, pki, fleet)
    poisoned = time.time() + 10 * YEAR
    (data / "command-nonces.cbor").write_bytes(cbor2.dumps({1: 1, 2: poisoned, 3: []}, canonical=True))
    # Accepted before the poisoning (an hour-long command), its nonce since forgotten: a replay candidate.
    before = sign_command(fleet.commands_key, DEVICE, "ping", {}, now=time.time() - 5, ttl_s=3600)
    cfg = parse_config(
        {
            "device": {"id": DEVICE, "data_dir": str(data)},
            "sink": {"kind": "telemetry"},
            "telemetry": {"host": broker.host, "port": broker.port},
        }
    )
    telemetry = DeviceTelemetry(cfg, model_id="m@1", model_sha256="0" * 64, backend="numpy")
    # The OTA time floor, written by the same old code after the same command.
    ota_floor_file = data / "time-floor.json"
    ota_floor_file.write_text(json.dumps({"floor": poisoned, "source": "command"}))
    ota_floor = TimeFloor(ota_floor_file)
    telemetry.enable_ota(
        request_update=lambda *_a: {"accepted": False},
        request_rollback=lambda *_a: {"accepted": False},
        time_floor=ota_floor,
    )
    gw = Gateway(broker, pki)
    try:
        telemetry.start()
        birth = json.loads(gw.wait("status", 1)[0])
        assert birth["time"]["command_floor"] == poisoned == birth["time"]["ota_floor"]
        locked = gw.send(sign_command(fleet.commands_key, DEVICE, "ping", {}, now=time.time()))
        assert locked["error"] == "expired" and "time/reset" in locked["detail"]
        started = time.time()
        reset = sign_command(
            fleet.commands_key, DEVICE, "time/reset", {"to": started}, now=max(started, birth["time"]["command_floor"])
        )
        reply = gw.send(reset)
        assert reply["ok"] and reply["command"] == "time/reset" and reply["result"]["lowered"] is True, reply
        assert started <= reply["result"]["command_floor"] <= time.time()
        assert reply["result"]["command_not_before"] == reply["result"]["command_floor"]
        assert started <= reply["result"]["ota_floor"] == ota_floor.floor() <= time.time()
        assert TimeFloor(ota_floor_file).floor() == ota_floor.floor()  # persisted
        republished = json.loads(gw.wait("status", 2)[-1])  # the box says so in its status at once
        assert republished["time"] == {k: reply["result"][k] for k in republished["time"]}
        assert gw.send(sign_command(fleet.commands_key, DEVICE, "ping", {}, now=time.time()))["ok"]
        replayed = gw.send(before)
        assert replayed["error"] == "expired" and "before the time reset" in replayed["detail"]
        assert gw.send(reset)["error"] == "replayed"
    finally:
        stats = telemetry.close()
        gw.close()
    assert stats["commands_rejected"] == {"expired": 2, "replayed": 1}
    assert stats["commands_executed"] == {"time/reset": 1, "ping": 1}


def test_time_reset_arguments_are_checked_before_any_floor_moves() -> None:
    # A reset whose "to" is later than its own issue time would be a way to push floors forward: refused, as are
    # a missing or non-numeric "to"; a box without floors says so.
    calls: list[float] = []

    def reset_time(to: float) -> dict:
        calls.append(to)
        return {"lowered": True}

    def controls(**kw) -> DeviceControls:
        return DeviceControls(republish_status=dict, set_batching=lambda *_a: None, set_log_level=lambda _l: None, **kw)

    def command(args: dict, issued_at: float = 1_800_000_000.0) -> Command:
        return Command(DEVICE, "time/reset", args, b"\x01" * 16, issued_at, issued_at + 60)

    executor = CommandExecutor(controls(reset_time=reset_time))
    for bad in ({"to": 1_800_000_001.0}, {}, {"to": "now"}, {"to": True}, {"to": 1.0, "x": 1}):
        with pytest.raises(CommandRejected) as ei:
            executor.execute(command(bad), 0.0)
        assert ei.value.reason == "invalid_argument" and ei.value.command is not None
    assert calls == []
    assert executor.execute(command({"to": 1_799_999_000}), 0.0) == {"lowered": True}
    assert calls == [1_799_999_000.0]
    with pytest.raises(CommandRejected) as ei:
        CommandExecutor(controls()).execute(command({"to": 1_799_999_000}), 0.0)
    assert ei.value.reason == "unavailable"
