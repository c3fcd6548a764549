"""``edge gateway run``: one gateway process, from configuration to a clean stop.

It connects to the broker as the gateway identity with a persistent MQTT 5 session, subscribes to the devices'
telemetry through a shared subscription (``$share/<group>/devices/+/telemetry``: processes in one group split the
load, each envelope goes to one of them) and to their status (``devices/+/status``, not shared: retained messages
are never delivered on shared subscriptions, and every process may record the same status), stores through the
ingest loop, sends each box a signed receipt for what is stored (``edge.fleet.receipts``, retained on
``devices/<id>/receipts``), serves Prometheus metrics (per box too, ``edge.fleet.device_gauges``) and ``/healthz``,
re-signs the TUF repository's snapshot and timestamp before they expire (``edge.fleet.models.freshness``), and
(``[rollout] enabled``) drives the fleet's current model rollout, publishing its signed commands on the same
connection (``edge.fleet.rollout.driver``), and applies the fleet registry to the broker's access rules on that
connection too (``edge.fleet.broker_sync``). SIGTERM or SIGINT stops it: what was received is stored and
acknowledged, then it disconnects cleanly. Under systemd (``Type=notify``) it reports READY once connected.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from edge import log as edge_log
from edge.fleet.config import GatewayConfig
from edge.fleet.device_gauges import DeviceGauges
from edge.fleet.errors import IngestFailedError
from edge.fleet.ingest import IngestLoop, IngestStats
from edge.fleet.metrics import GatewayMetrics
from edge.fleet.models.freshness import TimestampKeeper
from edge.fleet.pki.receipt_key import ensure_receipt_key
from edge.fleet.pki.registry import broker_sync_for_fleet
from edge.fleet.receipts import ReceiptIssuer
from edge.fleet.rollout.driver import RolloutDriver
from edge.fleet.store import Store, open_store
from edge.fleet.suspend import RejectBudget
from edge.log import event, redact
from edge.mqtt import BROKER_SETTING_NAMES, MqttSettings, MqttTransport
from edge.systemd import Notifier, WatchdogPolicy
from edge.wire.topics import gateway_subscriptions

__all__ = ["Gateway", "mqtt_settings", "run_gateway", "subscriptions"]

log = logging.getLogger("edge.gateway")


def subscriptions(share_group: str) -> list[str]:
    """The topic filters a gateway subscribes to (``edge.wire.topics``)."""
    return gateway_subscriptions(share_group)


def mqtt_settings(cfg: GatewayConfig, **overrides: Any) -> MqttSettings:
    """The gateway's broker connection from its configuration; ``overrides`` replace fields (e.g. ``client_id``)."""
    b = cfg.broker
    fields: dict[str, Any] = {
        "host": b.host,
        "port": b.port,
        "ca": cfg.fleet_path(b.ca),
        "cert": cfg.fleet_path(b.cert),
        "key": cfg.fleet_path(b.key),
        "client_id": cfg.gateway.id,
        "keepalive": b.keepalive_s,
        "session_expiry": b.session_expiry_s,
        "receive_maximum": cfg.gateway.receive_maximum,
        "backoff_max": 5.0,
    }
    fields.update(overrides)
    return MqttSettings(**fields)


class Gateway:
    """The parts of a running gateway: metrics, ingest loop, broker connection, broker sync, rollout driver.

    Args:
        cfg: the validated configuration.
        store_factory: opens the store (default: ``open_store(cfg.store_url)``); called on the ingest thread.
    """

    def __init__(self, cfg: GatewayConfig, *, store_factory: Callable[[], Store] | None = None) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        url, rules, g = cfg.store_url, cfg.ledger.rules(), cfg.gateway
        opener = store_factory or (lambda: open_store(url, rules=rules))
        self.ingest = IngestLoop(
            opener,
            self.metrics,
            batch_max=cfg.gateway.batch_max,
            batch_wait_s=cfg.gateway.batch_wait_ms / 1000,
            store_timeout_s=cfg.gateway.store_timeout_s,
            # A suspension is enforced by disabling the box's client in the broker: only with dynamic security.
            budget=RejectBudget(g.reject_burst, g.reject_per_s) if cfg.broker.dynamic_security else None,
            suspend_s=g.suspend_s,
            gateway_id=g.id,
        )
        # Keeps the broker's access rules equal to the registry (edge.fleet.broker_sync), on this connection.
        self.broker_sync = broker_sync_for_fleet(g.fleet_dir, opener) if cfg.broker.dynamic_security else None
        if self.broker_sync is not None:
            sync = self.broker_sync
            self.ingest.on_suspended = lambda s: sync.kick(cut_off=[s.device_id])
        on_incoming = self.ingest.submit if self.broker_sync is None else self.broker_sync.route(self.ingest.submit)
        self.transport = MqttTransport(
            mqtt_settings(cfg),
            on_incoming=on_incoming,
            setting_names=BROKER_SETTING_NAMES,  # its failures name broker.*, not the box's telemetry.*
            subscriptions=[
                *subscriptions(cfg.gateway.share_group),
                *(self.broker_sync.subscriptions if self.broker_sync is not None else ()),
            ],
        )
        if self.broker_sync is not None:
            self.broker_sync.attach(self.transport)
        transport = self.transport
        self.ingest.receipts = ReceiptIssuer(
            ensure_receipt_key(g.fleet_dir),
            g.id,
            lambda topic, payload: transport.publish(topic, payload, qos=1, retain=True),
            interval_s=g.receipt_interval_s,
            metrics=self.metrics,
        )
        self.rollouts: RolloutDriver | None = None
        if cfg.rollout.enabled:
            fleet_dir = cfg.gateway.fleet_dir

            def commands_key() -> Any:
                from edge.fleet.pki.ca import FleetCA  # noqa: PLC0415 -- loaded only once a rollout has a command

                return FleetCA.load(fleet_dir).commands_key

            self.rollouts = RolloutDriver(
                fleet_dir,
                opener,
                self.transport.publish,
                commands_key,
                interval_s=cfg.rollout.interval_s,
                device_timeout_s=cfg.rollout.device_timeout_s,
                command_ttl_s=cfg.rollout.command_ttl_s,
                metrics=self.metrics,
            )
        # Per-box gauges, and the store check /healthz reports: a connection of their own, polled.
        self.devices = DeviceGauges(opener)
        self.metrics.registry.register(self.devices)
        self.tuf_keeper = TimestampKeeper(g.fleet_dir, self.metrics)
        self._server: Any = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the gateway does its job now (``/healthz``): connected to the broker, the store answers, ingest
        runs; with each part's state and, when unhealthy, the reasons (one line each)."""
        b = self.cfg.broker
        broker = "connected" if self.transport.connected else "disconnected"
        store = self.devices.store_state()
        ingest = "running" if self.ingest.alive else f"stopped: {self.ingest.failed}"
        reasons = []
        if broker != "connected":
            reasons.append(f"broker {b.host}:{b.port}: not connected")
        if store != "ok":
            reasons.append(f"store: {store}")
        if ingest != "running":
            reasons.append(f"ingest {ingest}")
        details: dict[str, Any] = {
            "status": "unavailable" if reasons else "ok",
            "gateway": self.cfg.gateway.id,
            "broker": broker,
            "store": store,
            "ingest": ingest,
        }
        if reasons:
            details["reasons"] = reasons
        return not reasons, details

    def start(self) -> None:
        """Open the store, serve metrics, connect (in the background).

        Raises:
            StoreError: the store cannot be opened.
            ConfigError: the TLS credentials cannot be loaded.
        """
        self.ingest.start()
        self.devices.start()
        if self.cfg.metrics.enabled:
            self._server = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port, self.health)
        self.transport.start()
        if self.broker_sync is not None:
            self.broker_sync.start()
        if self.rollouts is not None:
            self.rollouts.start()
        self.tuf_keeper.start()

    def stop(self) -> IngestStats:
        """Stop the rollout driver, store and acknowledge what was received, disconnect, stop serving metrics.

        Returns:
            The ingest counters.
        """
        self.tuf_keeper.stop()
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.broker_sync is not None:
            self.broker_sync.stop()
        self.ingest.stop()
        self.transport.stop()
        self.devices.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        return self.ingest.stats


def run_gateway(cfg: GatewayConfig, *, stop: threading.Event | None = None) -> IngestStats:
    """Run a gateway until SIGTERM/SIGINT (or ``stop`` is set).

    Args:
        cfg: the configuration.
        stop: an event that stops the gateway when set (tests); signals are handled only on the main thread.

    Returns:
        The ingest counters at the end.

    Raises:
        IngestFailedError: ingest gave up (the store stayed unavailable past ``gateway.store_timeout_s``, or its
            worker failed); the caller exits non-zero so that the supervisor restarts the process.
    """
    edge_log.configure(cfg.log.level, cfg.log.format)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            event(log, logging.INFO, "stopping", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    notifier = Notifier()
    gw = Gateway(cfg)
    gw.start()
    # Tells `edge fleet status` its data is live; ends (recording the stop) when `stop` is set.
    from edge.fleet.heartbeat import start_heartbeat  # noqa: PLC0415 -- one edit point, kept beside its use

    start_heartbeat(lambda: open_store(cfg.store_url), cfg.gateway.id, lambda: gw.transport.connected, stop)
    event(
        log,
        logging.INFO,
        "gateway started",
        id=cfg.gateway.id,
        broker=f"{cfg.broker.host}:{cfg.broker.port}",
        store=redact(cfg.store_url),
        metrics=f"{cfg.metrics.host}:{cfg.metrics.port}" if cfg.metrics.enabled else None,
    )
    ready = False
    last_status = 0.0
    watchdog = WatchdogPolicy(notifier.watchdog_interval, time.monotonic()) if notifier.watchdog_interval else None
    try:
        while not stop.wait(0.2):
            if not gw.ingest.alive:
                # Never live on without ingesting: exit non-zero and let the supervisor start afresh.
                raise IngestFailedError(f"ingest stopped: {gw.ingest.failed}")
            up = gw.transport.connected
            gw.metrics.connected.set(1 if up else 0)
            gw.metrics.store_up.set(1 if gw.devices.store_state() == "ok" else 0)
            if up and not ready:
                ready = True
                notifier.send(READY=1, STATUS="connected")
            now = time.monotonic()
            # Fed only while the ingest worker turns (idle or storing): a worker stuck in a call makes systemd
            # restart the process.
            if watchdog is not None and watchdog.due(now, gw.ingest.heartbeat):
                notifier.send(WATCHDOG=1)
            if now - last_status >= 5.0:
                last_status = now
                s = gw.ingest.stats
                notifier.send(STATUS=f"accepted {s.accepted}, rejected {s.rejected}, records {s.records}")
    finally:
        notifier.send(STOPPING=1)
        stats = gw.stop()
        notifier.close()
        event(log, logging.INFO, "gateway stopped", **vars(stats))
    return stats
