"""The box's telemetry, assembled: device key, outbox, MQTT transport, publisher and the pipeline's sink.

Topics (``<id>`` is the device id, also the CN of its certificate, so the broker's ACL confines it there):

- ``devices/<id>/telemetry``: signed envelopes, QoS 1, in counter order.
- ``devices/<id>/status``: retained JSON. A birth message on every (re)connect (state "online", model, versions,
  did:key, outbox backlog, and ``time``: ``build``, ``command_floor``, ``command_not_before``, ``ota_floor``, so the
  fleet can reach a box whose floor is wrongly in the future), the Last Will (state "offline", reason "lost") if the
  connection dies, and state "offline", reason "shutdown" on a clean stop. Sparkplug-style: the gateway derives
  online/offline from it.
- ``devices/<id>/commands``: subscribed at QoS 1. A command runs only if it is signed by the fleet command key
  (``telemetry.fleet_key``), addressed to this device, unexpired and never seen before (``edge.wire.commands``;
  the nonces persist in ``<data_dir>/command-nonces.cbor``). Without a provisioned key every command is rejected
  ``unsigned``; the service runs on either way. The verifier bounds the nonce set's floor by the box's own time and
  the OTA time floor (``edge.ota.clock``), and ``time/reset`` lowers both floors.
- ``devices/<id>/replies``: one JSON reply per command message, QoS 1, not retained (``edge.telemetry.control``).
  Every rejection is also counted by reason (``commands_rejected``) and logged.
- ``devices/<id>/receipts``: subscribed at QoS 1; the fleet's signed receipts (``edge.wire.receipts``), verified with
  the fleet receipt key (``telemetry.receipt_key``). An envelope leaves the outbox only when a receipt covers it; the
  birth status on every (re)connect asks the gateway for a fresh one. Without the key (an empty
  ``telemetry.receipt_key``, or a missing file, which is logged as an error) the outbox deletes on the broker's
  PUBACK, and the status says ``"delivery": "puback"``. A receipt that does not verify is counted and logged.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge import __version__
from edge.config import Config, data_path, resolve_device_id
from edge.errors import ConfigError, TransportError
from edge.identity.did import did_key_from_public
from edge.identity.errors import KeyFileError
from edge.identity.keys import load_private_key, load_public_key
from edge.log import Throttle, event
from edge.mqtt import MqttSettings, MqttTransport
from edge.ota.clock import BUILD_TIME, TimeFloor, horizon
from edge.telemetry.control import COMMAND_NAMES, TIME_RESET, CommandExecutor, DeviceControls, reply_for
from edge.telemetry.nonces import FileNonceStore
from edge.telemetry.outbox import Outbox
from edge.telemetry.publisher import Publisher, ReceiptPolicy
from edge.telemetry.sink import TelemetrySink
from edge.wire.commands import (
    Command,
    CommandRejected,
    CommandsUnavailable,
    CommandUnsigned,
    CommandVerifier,
)
from edge.wire.receipts import Receipt, ReceiptError, verify_receipt
from edge.wire.schema import DEFAULT_LIMITS
from edge.wire.topics import device_topics

__all__ = ["DeviceTelemetry"]

log = logging.getLogger("edge.telemetry")

NONCE_FILE = "command-nonces.cbor"


def _versions() -> dict[str, str]:
    import numpy  # noqa: PLC0415 (already loaded by the pipeline; imported here for its version only)
    import onnxruntime  # noqa: PLC0415

    return {
        "edge": __version__,
        "onnxruntime": str(onnxruntime.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


class DeviceTelemetry:
    """Owns the telemetry parts of a running service; ``sink`` is what the pipeline writes to.

    Args:
        cfg: the validated configuration (``[telemetry]`` and ``[device]``).
        model_id, model_sha256, backend: facts for the birth message.

    Raises:
        ConfigError: the device key, certificate or CA cannot be loaded, or ``device.id`` is set and is not the
            certificate's CN (``edge.config.resolve_device_id``).
        OutboxError: the outbox cannot be opened.
    """

    def __init__(self, cfg: Config, *, model_id: str, model_sha256: str, backend: str) -> None:
        tc = cfg.telemetry
        self.device_id = resolve_device_id(cfg)  # the certificate's CN: the id the broker confines this box to
        key_path = data_path(cfg, tc.key)
        try:
            key = load_private_key(key_path)
        except KeyFileError as e:  # named by the operator's key, not the identity layer's "key file"
            expected = (
                e.expected
                if key_path.exists() or key_path.is_symlink()
                else "this box's private key, but there is none: is this box enrolled? (`edge enroll --claim CODE`)"
            )
            raise ConfigError("telemetry.key", str(key_path), expected) from e
        self.did = did_key_from_public(key.public_key())
        self.topics = device_topics(self.device_id)
        outbox_path = data_path(cfg, tc.outbox)
        outbox_path.parent.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            outbox_path,
            device_id=self.device_id,
            key=key,
            limits=DEFAULT_LIMITS,
            max_bytes=int(tc.outbox_max_mb * 2**20),
            max_envelopes=tc.outbox_max_envelopes,
        )
        self.commands_rejected: Counter[str] = Counter()
        self.commands_executed: Counter[str] = Counter()
        self._verifier, self._no_commands = _open_command_verifier(cfg, self.device_id)
        self._receipt_key = _open_receipt_key(cfg)
        self.receipts_rejected = 0
        self._receipt_log = Throttle(60.0)
        self._facts = {"model": model_id, "model_sha256": model_sha256, "backend": backend, "versions": _versions()}
        settings = MqttSettings(
            host=tc.host,
            port=tc.port,
            ca=data_path(cfg, tc.ca),
            cert=data_path(cfg, tc.cert),
            key=data_path(cfg, tc.key),
            client_id=self.device_id,
            keepalive=tc.keepalive_s,
            session_expiry=tc.session_expiry_s,
        )
        will = (self.topics["status"], self._status("offline", reason="lost"), True)
        self.transport = MqttTransport(
            settings,
            will=will,
            birth=lambda: (self.topics["status"], self._status("online")),
            on_message=self._on_message,
            subscriptions=[self.topics["commands"], self.topics["receipts"]],
        )
        policy = (
            None
            if self._receipt_key is None
            else ReceiptPolicy(
                timeout_s=tc.receipt_timeout_s,
                backoff_max_s=max(600.0, tc.receipt_timeout_s),
                max_unreceipted=tc.max_unreceipted,
            )
        )
        self.publisher = Publisher(
            self.outbox, self.transport, self.topics["telemetry"], receipts=policy, **_window(tc.window)
        )
        self.publisher.last_receipt = self._kept_receipt()
        self.sink = TelemetrySink(
            self.outbox, wake=self.publisher.wake, batch_records=tc.batch_records, batch_age_s=tc.batch_age_s
        )
        self._drain_timeout = tc.drain_timeout_s
        self._on_verified: Callable[[Command], None] | None = None
        self._time_floor: TimeFloor | None = None
        self._executor = CommandExecutor(
            DeviceControls(
                republish_status=self._republish_status,
                set_batching=self.sink.set_batching,
                set_log_level=lambda level: logging.getLogger("edge").setLevel(level.upper()),
                reset_time=self._reset_time,
            )
        )

    def enable_ota(
        self,
        *,
        request_update: Callable[[str, str, bool, str | None], Mapping[str, Any]],
        request_rollback: Callable[[str, str, str | None], Mapping[str, Any]],
        on_verified: Callable[[Command], None] | None = None,
        time_floor: TimeFloor | None = None,
    ) -> None:
        """Route ``models/update`` and ``models/rollback`` to the updater; ``on_verified`` sees every verified command
        but ``time/reset`` (the updater offers its signed issue time to the time floor; a reset's issue time is the
        box's wrong floor on purpose). ``time_floor``: the OTA time floor, which bounds the command floor, is lowered
        by ``time/reset`` and is reported in the status. Call before ``start``."""
        self._executor = CommandExecutor(
            replace(self._executor.controls, request_update=request_update, request_rollback=request_rollback)
        )
        self._on_verified = on_verified
        self._time_floor = time_floor

    def set_model(self, model_id: str, model_sha256: str) -> None:
        """Report a newly active model: the next status messages name it, and one is published now if connected."""
        self._facts = {**self._facts, "model": model_id, "model_sha256": model_sha256}
        if self.transport.connected:
            try:
                self._republish_status()
            except (TransportError, ValueError) as e:
                event(log, logging.WARNING, "status not republished", error=str(e))

    def _status(self, state: str, **extra: Any) -> bytes:
        body: dict[str, Any] = {"state": state, "device": self.device_id, "did": self.did, "ts": time.time()}
        if state == "online":
            body.update(self._facts)
            body["outbox_backlog"] = self.outbox.stats().backlog_envelopes
            body["time"] = self._times()
            body["delivery"] = "receipts" if self._receipt_key is not None else "puback"
            last = self.publisher.last_receipt
            if last is not None:
                body["receipt"] = last.summary()
        body.update(extra)
        return json.dumps(body, separators=(",", ":")).encode()

    def _times(self) -> dict[str, float | None]:
        """The box's times for its status: what the fleet needs to issue a command the box will not find expired."""
        seen = None if self._verifier is None else self._verifier.seen
        return {
            "build": BUILD_TIME,
            "command_floor": None if seen is None else seen.floor(),
            "command_not_before": None if seen is None else seen.not_before(),
            "ota_floor": None if self._time_floor is None else self._time_floor.floor(),
        }

    def _proven(self) -> float:
        return 0.0 if self._time_floor is None else self._time_floor.lower_bound()

    def _reset_time(self, to: float) -> dict[str, Any]:
        """``time/reset``: lower the OTA time floor, then the command floor (bounded below by the OTA floor's
        ``lower_bound``, so the OTA floor goes first), and publish the new status."""
        if self._verifier is None:  # unreachable: without a verifier no command gets here
            raise CommandsUnavailable("time/reset: commands are disabled")
        now = time.time()
        if self._time_floor is not None:
            try:
                self._time_floor.reset(to, clock=now)
            except OSError as e:
                raise CommandsUnavailable(f"time/reset: cannot write {self._time_floor.path}: {e.strerror}") from e
        lowered = self._verifier.reset_time(to, now, proven=self._proven())
        times = self._times()
        event(log, logging.WARNING, "time floors reset by the fleet", to=to, lowered=lowered, **times)
        if self.transport.connected:
            try:
                self._republish_status()
            except (TransportError, ValueError) as e:
                event(log, logging.WARNING, "status not republished", error=str(e))
        return {"lowered": lowered, **times}

    def _republish_status(self) -> dict[str, Any]:
        body = self._status("online")
        self.transport.publish(self.topics["status"], body, retain=True)  # TransportError: the reply says so
        result: dict[str, Any] = json.loads(body)
        return result

    def _kept_receipt(self) -> Receipt | None:
        """The latest receipt the outbox kept, checked again: the status reports it from the start."""
        data = self.outbox.delivery().receipt
        if data is None or self._receipt_key is None:
            return None
        try:
            return verify_receipt(data, self._receipt_key, self.device_id)
        except ReceiptError:
            return None  # kept under another key: the next receipt replaces it

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics["receipts"]:
            self._on_receipt(payload)
        else:
            self._on_command(topic, payload)

    def _on_receipt(self, payload: bytes) -> None:
        # Network thread: verify here (one Ed25519 check), apply on the publisher thread (outbox I/O).
        if self._receipt_key is None:
            return
        try:
            receipt = verify_receipt(payload, self._receipt_key, self.device_id)
        except ReceiptError as e:
            self.receipts_rejected += 1
            suppressed = self._receipt_log.allow("receipt")
            if suppressed is not None:
                # Every receipt failing means nothing leaves the outbox: the likely cause is a key that is not the
                # fleet's (a fleet that made a new receipts.key), so the message names the file and the fix.
                event(
                    log,
                    logging.ERROR,
                    "receipt rejected: envelopes stay in the outbox until a valid receipt covers them",
                    error=str(e),
                    key="telemetry.receipt_key",
                    fix="if every receipt fails, copy fleet-receipts.pub from this box's bundle (edge fleet enroll) "
                    "again",
                    bytes=len(payload),
                    suppressed=suppressed,
                )
            return
        self.publisher.on_receipt(receipt, payload)

    def _on_command(self, topic: str, payload: bytes) -> None:
        # Runs on the MQTT network thread: nothing here may wait for a PUBACK (that thread delivers it).
        now = time.time()
        reply: dict[str, Any]
        try:
            if self._verifier is None:
                raise self._no_commands()  # a fresh exception per message: a reused one would grow its traceback
            cmd = self._verifier.verify(payload, now, proven=self._proven())
            if self._on_verified is not None and cmd.name != TIME_RESET:
                self._on_verified(cmd)
            reply = reply_for(self._executor.execute(cmd, now), cmd)
        except CommandRejected as e:
            self.commands_rejected[e.reason] += 1
            n = self.commands_rejected[e.reason]
            if n <= 10 or n % 1000 == 0:
                named = {} if e.command is None else {"command": e.command.name, "nonce": e.command.nonce.hex()}
                event(
                    log,
                    logging.WARNING,
                    "command rejected",
                    topic=topic,
                    bytes=len(payload),
                    reason=e.reason,
                    detail=str(e),
                    count=n,
                    **named,
                )
            reply = reply_for(e)
        else:
            self.commands_executed[cmd.name] += 1
            event(log, logging.INFO, "command executed", command=cmd.name, nonce=cmd.nonce.hex(), args=dict(cmd.args))
        try:
            self.transport.publish(self.topics["replies"], json.dumps(reply, separators=(",", ":")).encode(), qos=1)
        except (TransportError, ValueError) as e:
            event(log, logging.WARNING, "command reply not sent", error=str(e))

    def start(self) -> None:
        """Connect (in the background) and start publishing the outbox."""
        self.transport.start()
        self.publisher.start()

    def close(self) -> dict[str, Any]:
        """Seal what is waiting, publish what the drain timeout allows, say goodbye, close. Returns final stats."""
        self.sink.close()
        self.publisher.stop(drain_timeout=self._drain_timeout)
        if self.transport.connected:
            self.transport.publish(self.topics["status"], self._status("offline", reason="shutdown"), retain=True).wait(
                2
            )
        self.transport.stop()
        stats = self.outbox.stats()
        self.outbox.close()
        p = self.publisher.stats()
        return {
            "envelopes_sealed": self.sink.stats.envelopes,
            "records_rejected": self.sink.stats.rejected_records,
            "published": p.published,
            "acked": p.acked,
            "receipted": p.receipted,
            "unreceipted": p.unreceipted,
            "resent": p.resent,
            "receipts_rejected": self.receipts_rejected + p.receipt_failures,
            "outbox_backlog": stats.backlog_envelopes,
            "outbox_dropped": stats.dropped_envelopes,
            "commands_executed": dict(self.commands_executed),
            "commands_rejected": dict(self.commands_rejected),
        }


def _window(window: int) -> dict[str, int]:
    return {"window": window} if window else {}


def _open_receipt_key(cfg: Config) -> Ed25519PublicKey | None:
    """The fleet receipt key, or None: the outbox then deletes on the broker's PUBACK (said loudly at start)."""
    tc = cfg.telemetry
    if tc.receipt_key is None:
        event(
            log,
            logging.WARNING,
            "receipts disabled (telemetry.receipt_key is empty): envelopes leave the outbox on the broker's PUBACK, "
            "so a broker or gateway failure can lose them",
        )
        return None
    path = data_path(cfg, tc.receipt_key)
    try:
        return load_public_key(path)
    except (ConfigError, OSError) as e:
        event(
            log,
            logging.ERROR,
            "no fleet receipt key: envelopes leave the outbox on the broker's PUBACK, so a broker or gateway failure "
            "can lose them. Fix: copy fleet-receipts.pub from the box's bundle (edge fleet enroll) to this path",
            key="telemetry.receipt_key",
            path=str(path),
            error=str(e),
        )
        return None


def _open_command_verifier(cfg: Config, device_id: str) -> tuple[CommandVerifier | None, Callable[[], CommandRejected]]:
    """The command verifier, or None and how to reject every command (the service runs on without commands)."""
    tc = cfg.telemetry
    if tc.fleet_key is None:
        return None, partial(CommandUnsigned, "commands are disabled (telemetry.fleet_key is empty)")
    path = data_path(cfg, tc.fleet_key)
    if not path.exists() and not path.is_symlink():
        event(log, logging.WARNING, "no fleet command key: every command will be rejected", path=str(path))
        return None, partial(CommandUnsigned, f"no fleet key provisioned ({path})")
    try:
        key = load_public_key(path)
        nonces = data_path(cfg, Path(NONCE_FILE))
        nonces.parent.mkdir(parents=True, exist_ok=True)
        seen = FileNonceStore(nonces)
    except (ConfigError, OSError) as e:
        # Local misconfiguration, but telemetry matters more than commands: run on, refuse commands, say why.
        event(log, logging.ERROR, "commands disabled", error=str(e))
        return None, partial(CommandsUnavailable, f"commands disabled: {e}")
    verifier = CommandVerifier(key, device_id, seen=seen, allowed=COMMAND_NAMES, build_time=BUILD_TIME)
    if seen.floor() > horizon(time.time(), BUILD_TIME):
        # A nonce file from before the horizon rule (or a box clock that was far ahead): kept as it is, because
        # lowering it could reopen replays; the status reports it and the fleet runs time/reset (docs/commands.md).
        event(
            log,
            logging.WARNING,
            "command floor is ahead of the box's clock: commands will be expired until the fleet runs time/reset",
            path=str(nonces),
            floor=seen.floor(),
        )
    return verifier, partial(CommandUnsigned, "unreachable: the verifier exists")
