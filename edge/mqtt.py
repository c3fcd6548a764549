"""MQTT 5 over mutual TLS to the fleet gateway: the only module of edge that imports paho.

Everything paho-specific stays here: callers see ``MqttSettings``, ``MqttTransport``, ``Delivery``, ``Backoff`` and
``edge.errors.TransportError``; no paho type, callback signature or return code crosses the module boundary.

Invariants:
- One paho client per network connection. A supervisor thread connects (TCP, TLS 1.2+ with the device certificate,
  CONNECT with ``clean_start=False`` and a Session Expiry Interval), runs paho's network thread for that connection
  only (``reconnect_on_failure=False``), and when the connection ends it discards the client and reconnects with a
  fresh one after a jittered exponential backoff (``Backoff``: full jitter, reset by every successful CONNACK).
- Every ``publish`` returns a ``Delivery`` that resolves exactly once: on PUBACK with its reason code (success or
  failure, e.g. "Not authorized"), or with a ``TransportError`` when the connection ends before the PUBACK (or the
  transport is not connected, or stops). Pending deliveries are registered by packet id in the connection's table
  and removed from it in ``finally``-style code on every path (PUBACK, connection loss, stop).
- paho keeps unacknowledged QoS 1 messages in memory and would resend them on reconnect. We never rely on that
  copy, and it can never cause a silent resend: the client that holds it is thrown away with its connection, after
  its deliveries failed with ``TransportError``. Retransmission belongs to the caller, who holds the message durably
  (the outbox) and republishes it; a message is therefore never lost inside this module nor left unaccounted.
- On every successful (re)connect, before ``connected`` turns true and before any caller's publish can be queued,
  the retained birth message is queued first and the subscriptions are (re)issued. The Last Will (the retained
  "death" status) fires only when the connection dies without a DISCONNECT; ``stop`` sends a clean DISCONNECT.
- paho sends more than the broker's Receive Maximum if asked to; ``receive_maximum`` reports the broker's value so
  the caller keeps its window within it.
- Every failed connection is named (``edge.mqtt_failures.classify_connect_error``: wrong CA, expired or revoked
  certificate, client id not the certificate's CN, identity not granted, identity used by another connection,
  broker unreachable, other), logged once per attempt with the address, the file or setting at fault and the fix,
  counted in ``failures`` and kept as ``last_failure``. A permanent failure (a human must act) is logged at ERROR
  (throttled) and retried on the long schedule (``permanent_backoff``: 30 s doubling to 10 min, at least half of
  each step), so a fleet of misconfigured boxes does not hammer the broker; a network failure keeps ``backoff``.
  A successful CONNACK resets both.

Measured (tools/bench/telemetry.py: mosquitto 2.0.11 on loopback with TLS 1.3 and client certificates, 2 shared
cores, 3000 envelopes of 100 records, 2053 bytes each, best of 3, envelopes/s):

    raw paho QoS 1 from memory, paho in-flight 20 / 100 / unlimited      9.6k / 10.8k / 15.9k
    Publisher + MqttTransport, in-memory outbox, window 20/100/500/1000   8.1k / 10.1k / 10.8k / 10.5k
    Publisher, SQLite outbox, row verification off, same windows          6.2k / 6.3k / 8.6k / 8.4k
    Publisher, SQLite outbox, row verification on (its default)           1.9k / 2.5k / 3.4k / 3.7k

paho is fastest with its own in-flight limit off (its limited mode rescans the message table on every PUBACK), so
``MqttSettings.inflight`` defaults to 0 and the caller bounds its window (``Publisher``, default 500: the plateau).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.errors import ConfigError, TransportError
from edge.log import Throttle, event
from edge.mqtt_failures import (
    BROKER_SETTING_NAMES,
    SESSION_TAKEN_OVER,
    TAKEOVER_LIMIT,
    ConnectContext,
    ConnectFailure,
    SettingNames,
    TakeoverWatch,
    certificate_facts,
    classify_connect_error,
)

__all__ = [
    "BROKER_SETTING_NAMES",
    "NO_MATCHING_SUBSCRIBERS",
    "Backoff",
    "ConnectFailure",
    "Delivery",
    "Incoming",
    "MqttSettings",
    "MqttTransport",
    "SettingNames",
]

log = logging.getLogger("edge.mqtt")

# MQTT 5: Receive Maximum defaults to 65535 when the CONNACK does not carry one.
DEFAULT_RECEIVE_MAXIMUM: Final = 65535
# MQTT 5 reason code: the broker accepted the PUBLISH but no subscription matched it, so nobody will receive it.
NO_MATCHING_SUBSCRIBERS: Final = 0x10
_POLL_S: Final = 0.05  # how soon the supervisor notices stop(): it also bounds stop()'s latency
# How long to wait, after a TLS 1.3 handshake, for the broker's verdict on our certificate before CONNECT goes out
# (see ``MqttTransport._await_tls_verdict``): one round trip normally; the whole wait only with a broker that sends
# no session tickets.
_TLS_VERDICT_WAIT_S: Final = 1.0
# A permanent failure is logged in full the first few times per cause, then at most once per interval (with the
# count of those not logged); the long schedule's own waits already space them out.
_PERMANENT_LOG_FIRST: Final = 3
_PERMANENT_LOG_EVERY_S: Final = 900.0
# Each wait of the long schedule is at least this share of its ceiling: a box that cannot succeed must not retry at
# once, while the jitter above it still spreads a fleet that fails together (a CA rotated on the broker).
_PERMANENT_JITTER_FLOOR: Final = 0.5
# A refused birth: the first retry after 1 s, and the first three logged as warnings (a box that just enrolled).
_GRANT_BACKOFF_MIN_S: Final = 1.0
_GRANT_GRACE: Final = 3


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and how to connect.

    Attributes:
        host: the broker's host name or address (checked against its certificate).
        port: the broker's TLS port.
        ca: the fleet CA certificate (PEM) that signs the broker's certificate.
        cert: the device certificate (PEM); its CN is the device id the broker's ACLs use.
        key: the device private key (PEM).
        client_id: the MQTT client id (the device id): it names the persistent session.
        keepalive: seconds between PINGREQs when idle; a dead link is noticed after 1.5x this.
        session_expiry: seconds the broker keeps the session (subscriptions, queued messages) after a disconnect.
        inflight: paho's own in-flight limit, 0 for none (the default, measured fastest: the caller bounds its
            window and keeps it within ``MqttTransport.receive_maximum``).
        backoff_min: the first reconnect delay ceiling in seconds (doubles per failed attempt).
        backoff_max: the largest reconnect delay ceiling in seconds.
        permanent_backoff_min: the first delay ceiling after a permanent failure (a wrong CA, an expired, revoked or
            refused identity, an identity in use elsewhere: see ``edge.mqtt_failures``), doubling per such failure.
            Each wait is at least half its ceiling.
        permanent_backoff_max: the largest delay ceiling after a permanent failure.
        connect_timeout: seconds for TCP + TLS + CONNACK before the attempt counts as failed.
        receive_maximum: the most unacknowledged QoS 1 messages the broker may send us at once (MQTT 5 flow
            control, sent in CONNECT); 0 for the protocol's default (65535). A subscriber that acknowledges only
            after storing (the gateway) bounds its memory with it.
    """

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str
    keepalive: int = 30
    session_expiry: int = 3600
    inflight: int = 0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    permanent_backoff_min: float = 30.0
    permanent_backoff_max: float = 600.0
    connect_timeout: float = 10.0
    receive_maximum: int = 0

    def __post_init__(self) -> None:
        """Reject values the protocol or the reconnect loop cannot use.

        Raises:
            ConfigError: a value is out of range; the message names the field.
        """
        if not 0 < self.port < 65536:
            raise ConfigError("mqtt.port", self.port, "1..65535")
        if not self.client_id or len(self.client_id.encode()) > 65535:
            raise ConfigError("mqtt.client_id", self.client_id, "a non-empty id")
        if not 1 <= self.keepalive <= 65535:
            raise ConfigError("mqtt.keepalive", self.keepalive, "1..65535 seconds")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ConfigError("mqtt.session_expiry", self.session_expiry, "0..2**32-1 seconds")
        if self.inflight < 0:
            raise ConfigError("mqtt.inflight", self.inflight, ">= 0 (0: no paho limit)")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ConfigError("mqtt.backoff_min", self.backoff_min, f"> 0 and <= backoff_max ({self.backoff_max})")
        if not 0 < self.permanent_backoff_min <= self.permanent_backoff_max:
            raise ConfigError(
                "mqtt.permanent_backoff_min",
                self.permanent_backoff_min,
                f"> 0 and <= permanent_backoff_max ({self.permanent_backoff_max})",
            )
        if self.connect_timeout <= 0:
            raise ConfigError("mqtt.connect_timeout", self.connect_timeout, "> 0 seconds")
        if not 0 <= self.receive_maximum <= 65535:
            raise ConfigError("mqtt.receive_maximum", self.receive_maximum, "0..65535 (0: the protocol default)")


class Backoff:
    """Exponential backoff with jitter: attempt n waits uniform(floor * c, c) seconds, c = min(max, min * 2**n).

    Full jitter (``floor`` 0, the default) spreads a fleet that lost its broker at the same moment over the whole
    interval, so the broker is not hit by every box at once when it comes back. A floor keeps every wait long (the
    schedule after a permanent failure) while still spreading the fleet over the rest.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None, *, floor: float = 0.0) -> None:
        """Create a backoff policy.

        Args:
            minimum: the ceiling of the first delay (seconds, > 0).
            maximum: the largest ceiling (seconds, >= minimum).
            rng: the random source (seeded in tests); a fresh ``random.Random`` by default.
            floor: the shortest delay as a share of its ceiling (0 <= floor <= 1).

        Raises:
            ValueError: ``floor`` is outside [0, 1].
        """
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"backoff floor {floor!r}: expected 0..1")
        self.minimum = minimum
        self.maximum = maximum
        self.floor = floor
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not cryptography

    def ceiling(self, attempt: int) -> float:
        """The largest delay of ``attempt`` (0-based): ``min(maximum, minimum * 2**attempt)``."""
        return min(self.maximum, self.minimum * 2.0 ** min(attempt, 62))

    def delay(self, attempt: int) -> float:
        """A delay for ``attempt`` (0-based), uniform in ``[floor * ceiling(attempt), ceiling(attempt)]``.

        Args:
            attempt: how many attempts failed in a row before this wait.

        Returns:
            Seconds to wait.
        """
        c = self.ceiling(attempt)
        return self._rng.uniform(self.floor * c, c)


class Delivery:
    """The outcome of one publish: resolved once, on PUBACK or when the connection ends first.

    ``ok`` is true only for a PUBACK with a success reason code. A refused message (a PUBACK with a failure reason
    such as "Not authorized") has ``ok`` false, ``reason`` set and ``error`` None; a message whose connection ended
    first has ``error`` set to a ``TransportError`` (it may or may not have reached the broker: send it again).
    """

    __slots__ = ("_callbacks", "_error", "_event", "_lock", "_ok", "_reason", "_reason_code", "topic")

    def __init__(self, topic: str) -> None:
        """Create a pending delivery (transports and test doubles create them).

        Args:
            topic: the topic it was published to.
        """
        self.topic = topic
        self._lock = threading.Lock()
        self._event: threading.Event | None = None  # created by the first waiter: most deliveries are never waited
        self._callbacks: list[Callable[[Delivery], None]] | None = []
        self._ok = False
        self._reason: str | None = None
        self._reason_code: int | None = None
        self._error: TransportError | None = None

    def done(self) -> bool:
        """Whether it is resolved."""
        return self._callbacks is None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until resolved or ``timeout`` seconds passed.

        Args:
            timeout: seconds, None for no limit.

        Returns:
            True if resolved.
        """
        with self._lock:
            if self._callbacks is None:
                return True
            if self._event is None:
                self._event = threading.Event()
            ev = self._event
        return ev.wait(timeout)

    @property
    def ok(self) -> bool:
        """True when the broker acknowledged it with a success reason code."""
        return self._ok

    @property
    def reason(self) -> str | None:
        """The PUBACK reason ("Success", "Not authorized", ...) or the transport error's text; None while pending."""
        return self._reason

    @property
    def reason_code(self) -> int | None:
        """The PUBACK reason code (0 for success), None while pending or when the connection ended first."""
        return self._reason_code

    @property
    def error(self) -> TransportError | None:
        """The transport failure that resolved it, if it was not acknowledged."""
        return self._error

    def add_done_callback(self, fn: Callable[[Delivery], None]) -> None:
        """Call ``fn(self)`` once when resolved: now (on this thread) if it already is.

        Callbacks run on the thread that resolves the delivery (the transport's network thread): they must be quick
        and must not block on the transport. An exception from one is logged and does not stop the others.

        Args:
            fn: the callback.
        """
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def resolve(self, *, ok: bool, reason: str, reason_code: int | None = None) -> bool:
        """Resolve with the broker's answer (called by the transport or a test double).

        Args:
            ok: whether the reason code is a success.
            reason: the reason code's name.
            reason_code: its value.

        Returns:
            False if it was already resolved (the first resolution wins).
        """
        return self._settle(ok, reason, reason_code, None)

    def fail(self, error: TransportError) -> bool:
        """Resolve with a transport failure (called by the transport or a test double).

        Args:
            error: why no acknowledgement will come.

        Returns:
            False if it was already resolved.
        """
        return self._settle(False, str(error), None, error)

    def _settle(self, ok: bool, reason: str, code: int | None, error: TransportError | None) -> bool:
        with self._lock:
            callbacks = self._callbacks
            if callbacks is None:
                return False
            self._ok, self._reason, self._reason_code, self._error = ok, reason, code, error
            self._callbacks = None
            ev = self._event
        if ev is not None:
            ev.set()
        for fn in callbacks:
            _call(fn, self)
        return True

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("ok" if self._ok else f"failed: {self._reason}")
        return f"<Delivery {self.topic} {state}>"


def _call(fn: Callable[[Delivery], None], d: Delivery) -> None:
    try:
        fn(d)
    except Exception:  # a caller's bug must not kill the network thread or skip other callbacks
        log.exception("delivery callback %r failed", fn)


class Incoming:
    """A message received with manual acknowledgement: the PUBACK goes out only when ``ack`` is called.

    Attributes:
        topic: the topic it was published on.
        payload: its bytes.
        duplicate: the broker's DUP flag (a redelivery, e.g. after a reconnect).
    """

    __slots__ = ("_conn", "_mid", "_qos", "duplicate", "payload", "topic")

    def __init__(self, conn: _Connection, *, mid: int, qos: int, topic: str, payload: bytes, duplicate: bool) -> None:
        self._conn = conn
        self._mid = mid
        self._qos = qos
        self.topic = topic
        self.payload = payload
        self.duplicate = duplicate

    @property
    def qos(self) -> int:
        """The QoS it was delivered with (0: the broker will not redeliver it, and nothing is acknowledged)."""
        return self._qos

    def ack(self) -> bool:
        """Acknowledge (PUBACK) on the connection the message came on; safe from any thread.

        Returns:
            True if the PUBACK was queued; False if that connection has ended, in which case the broker
            redelivers the message in the resumed session (the receiver must be idempotent).
        """
        if self._qos == 0:
            return True
        if not self._conn.up:
            return False
        return self._conn.client.ack(self._mid, self._qos) == mqtt.MQTT_ERR_SUCCESS


class _Connection:
    """One network connection: its paho client and the deliveries waiting for its PUBACKs."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.pending: dict[int, Delivery] = {}
        # PUBACKs that arrived before ``publish`` registered their packet id (the network thread can be faster than
        # the publishing thread); consumed by that same publish call.
        self.early: dict[int, tuple[bool, str, int]] = {}
        self.up = False  # CONNACK with success received and the connection not ended
        self.ended = threading.Event()
        self.connack = threading.Event()
        self.refused: str | None = None
        # What tells a failure apart (edge.mqtt_failures): set once each, by whichever thread sees it.
        self.tls_error: OSError | None = None  # the broker's TLS alert, read before CONNECT went out
        self.socket_error: str | None = None  # the first socket error paho reported ("failed to receive on ...")
        self.disconnect_reason: str | None = None  # on_disconnect's reason name
        self.disconnect_from_server = False  # ...and whether it came in a DISCONNECT packet
        self.refused_publish = False  # the broker refused one of our publishes (mosquitto then closes the socket)
        self.aborted = False  # we shut the socket down ourselves (no CONNACK in time, stop)
        self.no_connack = False  # connect_timeout passed without a CONNACK
        # The broker refused our birth on our own status topic: this identity has no rights (yet). Subscriptions
        # made in this session were refused too, so it is closed and opened again (``_supervise``).
        self.birth_refused: str | None = None


class _SocketErrorLog(logging.Handler):
    """Keeps the first socket error paho reports on one connection: paho logs it and returns only a code."""

    def __init__(self, conn: _Connection) -> None:
        super().__init__(logging.ERROR)
        self._conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        """Record ``record``'s text if it is the connection's first socket error."""
        text = record.getMessage()
        if self._conn.socket_error is None and text.startswith(("failed to receive on socket", "timeout on socket")):
            self._conn.socket_error = text


def _paho_logger(conn: _Connection) -> logging.Logger:
    """A logger of one connection's own, outside the logging tree: nothing of paho's reaches the process's log (paho
    reports every ordinary connection loss at ERROR level); its socket errors are kept for classifying the failure.
    Not paho's ``on_log``: with a logger paho formats only what the level lets through, so the debug line of every
    PUBLISH costs nothing."""
    logger = logging.Logger("edge.mqtt.paho", logging.ERROR)
    logger.addHandler(_SocketErrorLog(conn))
    return logger


class MqttTransport:
    """A persistent MQTT 5 session over mutual TLS with reconnects, birth and will, and acknowledged publishes.

    Thread-safe: ``publish`` may be called from any thread. Incoming messages and delivery callbacks run on the
    network thread.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: tuple[str, bytes, bool] | None = None,
        birth: tuple[str, bytes] | Callable[[], tuple[str, bytes]] | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
        on_incoming: Callable[[Incoming], None] | None = None,
        subscriptions: list[str] | None = None,
        rng: random.Random | None = None,
        setting_names: SettingNames | None = None,
    ) -> None:
        """Create a transport (it does nothing until ``start``).

        Args:
            settings: where and how to connect.
            will: the Last Will ``(topic, payload, retain)`` the broker publishes (QoS 1) if the connection dies
                without a DISCONNECT: the "death" status.
            birth: ``(topic, payload)`` or a function returning it, published retained (QoS 1) on every successful
                (re)connect before anything else: the "birth" status. A function is called per connect, so the
                payload can carry fresh facts.
            on_message: called as ``on_message(topic, payload)`` on the network thread for each message received on
                ``subscriptions``; the PUBACK is sent after it returns. An exception is logged and the message acked.
            on_incoming: instead of ``on_message``, for receivers that acknowledge only once a message is safe:
                called with an ``Incoming`` on the network thread; nothing is acknowledged until its ``ack`` is
                called (from any thread). Unacknowledged messages come again after a reconnect.
            subscriptions: topic filters subscribed at QoS 1 on every (re)connect.
            rng: the random source of the reconnect jitter (seeded in tests).
            setting_names: the configuration keys a failure's message names (the box's ``telemetry.*`` and
                ``device.id`` by default).

        Attributes:
            backoff: the reconnect schedule after a network failure or a lost connection.
            permanent_backoff: the schedule after a permanent failure (``MqttSettings.permanent_backoff_*``).
            connects: successful CONNACKs so far.
            attempts: connection attempts so far.
        """
        self.settings = settings
        self._will = will
        self._birth = birth
        if on_message is not None and on_incoming is not None:
            raise ValueError("give on_message or on_incoming, not both")
        self._on_message = on_message
        self._on_incoming = on_incoming
        self._subscriptions = list(subscriptions or [])
        self.backoff = Backoff(settings.backoff_min, settings.backoff_max, rng)
        self.permanent_backoff = Backoff(
            settings.permanent_backoff_min, settings.permanent_backoff_max, rng, floor=_PERMANENT_JITTER_FLOOR
        )
        # After a refused birth: a box that just enrolled is granted within seconds (the gateway's registry poll),
        # so the first waits are short; one the fleet suspended or revoked reaches the long ceiling in a few steps.
        self.grant_backoff = Backoff(
            min(_GRANT_BACKOFF_MIN_S, settings.permanent_backoff_max),
            settings.permanent_backoff_max,
            rng,
            floor=_PERMANENT_JITTER_FLOOR,
        )
        self._names = setting_names or SettingNames()
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._up = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.connects = 0  # successful CONNACKs so far
        self.attempts = 0  # connection attempts so far
        self._last_failure: ConnectFailure | None = None
        self._failures: Counter[str] = Counter()
        self._takeovers = TakeoverWatch()
        self._refused_births = 0  # sessions in a row whose birth was refused (``_failed``)
        self._check_at_once = False  # the next attempt follows at once (a session closed without a reason)
        self._failure_log = Throttle(_PERMANENT_LOG_EVERY_S, first=_PERMANENT_LOG_FIRST)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (returns at once; see ``wait_connected``).

        Raises:
            ConfigError: the CA, certificate or key cannot be loaded.
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("transport already started")
        self._tls_context()  # fail fast on a bad certificate path: that is configuration, not a network failure
        self._thread = threading.Thread(target=self._supervise, name=f"mqtt-{self.settings.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (a DISCONNECT, so the will does not fire) and stop reconnecting.

        Deliveries still waiting for a PUBACK fail with ``TransportError``.

        Args:
            timeout: seconds to wait for the DISCONNECT to be sent and the threads to end.
        """
        self._stopping.set()  # the supervisor notices within _POLL_S and closes its connection itself
        self._up.clear()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        """True while a session is up (CONNACK received, birth and subscriptions queued)."""
        return self._up.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected or ``timeout`` seconds passed.

        Args:
            timeout: seconds, None for no limit.

        Returns:
            True if connected.
        """
        return self._up.wait(timeout)

    @property
    def last_failure(self) -> ConnectFailure | None:
        """Why the latest failed connection failed (cause, permanent, detail, fix, when); None before any failure.

        Not cleared by a later success (``connected`` tells whether a session is up now), so a status report can
        show what went wrong last and when.
        """
        with self._lock:
            return self._last_failure

    @property
    def failures(self) -> Counter[str]:
        """Failed connections so far by cause (``edge.mqtt_failures.CAUSES``); a copy."""
        with self._lock:
            return Counter(self._failures)

    @property
    def receive_maximum(self) -> int:
        """The broker's Receive Maximum of the current (or last) session: never have more QoS 1 messages in flight."""
        return self._receive_maximum

    # -- publishing ---------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False) -> Delivery:
        """Send one message; the returned ``Delivery`` resolves on PUBACK or when the connection ends first.

        Args:
            topic: the topic (no wildcards).
            payload: the bytes.
            qos: 0 or 1 (0 resolves once written to the socket).
            retain: whether the broker keeps it as the topic's retained message.

        Returns:
            The pending delivery.

        Raises:
            TransportError: not connected (nothing was sent).
            ValueError: an invalid topic, QoS or payload size.
        """
        if qos not in (0, 1):
            raise ValueError(f"qos {qos!r}: expected 0 or 1")
        with self._lock:
            conn = self._conn if self._up.is_set() else None
        if conn is None:
            raise TransportError(f"not connected to {self.settings.host}:{self.settings.port}")
        return self._publish_on(conn, topic, payload, qos, retain)

    def _publish_on(self, conn: _Connection, topic: str, payload: bytes, qos: int, retain: bool) -> Delivery:
        delivery = Delivery(topic)
        try:
            # Not under self._lock: paho calls on_publish with its own lock held, and on_publish takes self._lock.
            info = conn.client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as e:
            raise ValueError(f"cannot publish to {topic!r}: {e}") from e
        except (OSError, RuntimeError) as e:
            raise TransportError(f"publish to {topic!r} failed: {e}") from e
        early: tuple[bool, str, int] | None = None
        failure: TransportError | None = None
        with self._lock:
            if info.rc != mqtt.MQTT_ERR_SUCCESS or not conn.up:
                # Queued by a client whose connection is gone: that client is discarded, never resumed.
                conn.early.pop(info.mid, None)
                failure = TransportError(
                    f"connection lost before publishing to {topic!r}: {mqtt.error_string(info.rc)}"
                )
            else:
                early = conn.early.pop(info.mid, None)
                if early is None:
                    conn.pending[info.mid] = delivery
        if failure is not None:
            delivery.fail(failure)
        elif early is not None:
            delivery.resolve(ok=early[0], reason=early[1], reason_code=early[2])
        return delivery

    # -- the supervisor -----------------------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        s, names = self.settings, self._names
        # One file at a time, so the error names the key of the file at fault (telemetry.ca, broker.key...), not
        # all three at once.
        for name, path, what in (
            (names.ca, s.ca, "the fleet CA certificate"),
            (names.cert, s.cert, "this client's certificate"),
            (names.key, s.key, "this client's private key"),
        ):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(name, str(path), f"{what}, a readable file ({e.strerror})") from e
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(names.ca, str(s.ca), f"a PEM CA certificate ({e})") from e
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(s.cert), str(s.key))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                names.cert, f"{s.cert} with {names.key} {s.key}", f"a PEM certificate and its private key ({e})"
            ) from e
        return ctx

    def _supervise(self) -> None:
        attempt = 0  # failed attempts in a row, on the usual schedule
        permanent = 0  # permanent failures since the last success, on the long schedule
        refused_births = 0  # sessions in a row whose birth the broker refused, on the grant schedule
        while not self._stopping.is_set():
            self.attempts += 1
            failure: ConnectFailure | None = None
            try:
                came_up, failure = self._run_connection()
            except Exception:  # the loop must outlive any single failure; it is logged with its traceback
                log.exception("connection attempt failed unexpectedly")
                came_up = False
            if self._stopping.is_set():
                break
            if came_up:
                # Reset on a successful CONNACK: a broker restart should cost one short wait, not the accumulated one.
                attempt = permanent = refused_births = 0
                if failure is None:
                    self._failure_log = Throttle(_PERMANENT_LOG_EVERY_S, first=_PERMANENT_LOG_FIRST)
            if came_up:
                self._refused_births = 0
            if failure is not None and failure.after_connack:
                delay, schedule = self.grant_backoff.delay(refused_births), "grant"
                refused_births += 1
            elif failure is not None and failure.cause == "identity_in_use":
                # Short at first, then doubling with every further takeover within the window: two boxes with one
                # identity slow their fight down to minutes, while a broker restarted a few times in a row (which
                # looks the same on mosquitto 2.0, without a reason code) costs a second.
                streak = max(0, self._takeovers.count - TAKEOVER_LIMIT)
                delay, schedule = self.grant_backoff.delay(streak), "takeover"
            elif failure is not None and failure.permanent:
                # Retrying soon cannot help until a human acts; waiting long spares the broker a fleet of such boxes.
                delay, schedule = self.permanent_backoff.delay(permanent), "permanent"
                permanent += 1
            elif self._check_at_once:
                # The session was closed without a word: see at once whether the broker is still there (see
                # ``_taken_over``). Once per such close, so it never becomes a loop of its own.
                self._check_at_once = False
                attempt, delay, schedule = 0, 0.0, "immediate"
            else:
                attempt = 0 if came_up else attempt + 1
                delay, schedule = self.backoff.delay(attempt), "transient"
            event(log, logging.INFO, "reconnecting", delay_s=round(delay, 3), attempt=attempt, schedule=schedule)
            self._stopping.wait(delay)

    def _new_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,  # reconnecting is ours: a fresh client per connection
            manual_ack=self._on_incoming is not None,
        )
        client.suppress_exceptions = True  # our callbacks catch their own errors; never let paho's thread die
        # paho's log goes to a private logger per connection (``_paho_logger``): it reports every ordinary
        # connection loss at ERROR level; our "connected" and "disconnected" events carry the reason codes instead.
        client.tls_set_context(self._tls_context())
        client.connect_timeout = s.connect_timeout
        client.max_inflight_messages_set(s.inflight)
        client.max_queued_messages_set(0)
        if self._will is not None:
            topic, payload, retain = self._will
            client.will_set(topic, payload, qos=1, retain=retain)
        return client

    def _run_connection(self) -> tuple[bool, ConnectFailure | None]:
        """One connection from CONNECT to its end.

        Returns:
            Whether it reached CONNACK success, and why it failed (None: no failure, e.g. the session ended after a
            while the ordinary way, or the transport stopped).
        """
        s = self.settings
        try:
            client = self._new_client()
        except ConfigError as e:
            event(log, logging.ERROR, "cannot load TLS credentials", error=str(e))
            return False, None
        with self._lock:
            conn = _Connection(client)
            self._conn = conn
        client.enable_logger(_paho_logger(conn))
        client.on_socket_open = lambda _c, _u, sock: self._await_tls_verdict(conn, sock)
        client.on_connect = lambda _c, _u, flags, rc, props: self._on_connect(conn, flags.session_present, rc, props)
        client.on_disconnect = lambda _c, _u, flags, rc, _p: self._on_disconnect(
            conn, rc, flags.is_disconnect_packet_from_server
        )
        client.on_publish = lambda _c, _u, mid, rc, _p: self._on_publish(conn, mid, rc)
        if self._on_incoming is not None:
            client.on_message = lambda _c, _u, msg: self._on_paho_incoming(conn, msg)
        else:
            client.on_message = self._on_paho_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        props.SessionExpiryInterval = s.session_expiry
        if s.receive_maximum:
            props.ReceiveMaximum = s.receive_maximum
        try:
            client.connect(s.host, s.port, keepalive=s.keepalive, clean_start=False, properties=props)
        except (OSError, ValueError) as e:  # ssl.SSLError and timeouts are OSErrors
            self._end(conn, TransportError(f"connect to {s.host}:{s.port} failed: {e}"))
            return False, self._failed(e, None)
        client.loop_start()
        connack_deadline = time.monotonic() + s.connect_timeout
        try:
            while not conn.ended.wait(_POLL_S):
                if self._stopping.is_set():
                    self._close(conn, s.connect_timeout)
                    break
                if not conn.connack.is_set() and time.monotonic() > connack_deadline:
                    conn.no_connack = True
                    self._abort(conn)
                    break
                if conn.birth_refused is not None:
                    self._close(conn, s.connect_timeout)
                    break
        finally:
            if not conn.ended.wait(s.connect_timeout):
                self._abort(conn)
            client.loop_stop()
            why = "the transport stopped" if self._stopping.is_set() else "the connection was lost"
            self._end(conn, TransportError(f"{why} before the PUBACK ({s.host}:{s.port})"))
        came_up = conn.connack.is_set() and conn.refused is None
        if self._stopping.is_set():
            return came_up, None
        if conn.birth_refused is not None:
            # Not "up": the session had no rights, and the schedules must not reset as after a real session.
            return False, self._failed(None, conn.birth_refused, after_connack=True)
        if not came_up:
            error: OSError | None = conn.tls_error
            if error is None and conn.no_connack:
                error = TimeoutError(f"no CONNACK within {s.connect_timeout:g} s")
            return False, self._failed(error, conn.refused, socket_error=conn.socket_error)
        return True, self._taken_over(conn)

    def _taken_over(self, conn: _Connection) -> ConnectFailure | None:
        """The failure of a session that was up, if another connection with our identity took it over."""
        explicit = conn.disconnect_from_server and conn.disconnect_reason == SESSION_TAKEN_OVER
        # mosquitto 2.0.11 closes a session taken over without a DISCONNECT (measured): paho sees a clean EOF, which
        # it names "Unspecified error". Not a takeover: our own aborts and DISCONNECTs, a socket error, a keepalive
        # timeout, and the close mosquitto makes after refusing a publish.
        silent = (
            not conn.disconnect_from_server
            and conn.disconnect_reason == "Unspecified error"
            and conn.socket_error is None
            and not conn.aborted
            and not conn.refused_publish
        )
        if not (explicit or silent):
            return None
        count = self._takeovers.taken_over(time.monotonic())
        if not explicit and count < TAKEOVER_LIMIT:
            # A silent close is also a broker that died (SIGTERM and SIGKILL look the same). Reconnecting at once
            # tells them apart: a dead broker refuses (any failed attempt restarts the count, ``_failed``), one that
            # gave our session to another connection accepts, and then only a run of such closes names the cause.
            self._check_at_once = True
            return None
        return self._failed(None, None, disconnect_reason=conn.disconnect_reason, takeovers=count)

    def _failed(
        self,
        exc: BaseException | None,
        refused: str | None,
        *,
        socket_error: str | None = None,
        disconnect_reason: str | None = None,
        takeovers: int = 0,
        after_connack: bool = False,
    ) -> ConnectFailure:
        """Name a failure (``classify_connect_error``), record it, log it; returns it.

        ``after_connack``: the broker accepted the connection, then refused our birth. The first few such refusals
        are a box whose enrollment has not reached the broker yet (seconds), logged as warnings; after that, as the
        permanent failure they are.
        """
        s = self.settings
        try:
            # Read now, not at start: the certificate may have been renewed meanwhile, or expired while running.
            cn, not_after = certificate_facts(s.cert.read_bytes())
        except OSError:
            cn, not_after = None, None
        context = ConnectContext(s.host, s.port, str(s.ca), str(s.cert), s.client_id, cn, not_after, self._names)
        failure = classify_connect_error(
            exc,
            refused,
            context=context,
            now=time.time(),
            socket_error=socket_error,
            disconnect_reason=disconnect_reason,
            takeovers=takeovers,
        )
        if after_connack:
            failure = dataclasses.replace(failure, after_connack=True)
            self._refused_births += 1
            if self._refused_births <= _GRANT_GRACE:
                failure = dataclasses.replace(failure, permanent=False)
        else:
            self._refused_births = 0
        if failure.cause != "identity_in_use":
            self._takeovers.reset()  # an attempt failed: the sessions closed before were the broker's restart
        with self._lock:
            self._last_failure = failure
            self._failures[failure.cause] += 1
        fields: dict[str, object] = {
            "cause": failure.cause,
            "host": s.host,
            "port": s.port,
            "permanent": failure.permanent,
        }
        if failure.permanent:
            suppressed = self._failure_log.allow(failure.cause)
            if suppressed is None:  # counted in ``failures``; the line itself is kept for debugging
                event(log, logging.DEBUG, failure.message, **fields)
                return failure
            if suppressed:
                fields["suppressed"] = suppressed
        event(log, failure.level, failure.message, **fields)
        return failure

    def _await_tls_verdict(self, conn: _Connection, sock: object) -> None:
        """Before paho sends CONNECT on a TLS 1.3 connection, read the broker's verdict on our certificate.

        A TLS 1.3 client's handshake ends before the server has checked the client's certificate; a refusal then
        comes as an alert that, once CONNECT is on its way, mostly loses the race against the broker closing the
        socket (measured with mosquitto 2.0.11: 6 of 8 times paho saw only "EOF occurred in violation of
        protocol"). Waiting for the first record settles it: the session tickets (accepted) or the alert, whose
        ``ssl.SSLError.reason`` names it. A broker never speaks before CONNECT, so nothing of MQTT is read here.
        """
        if not isinstance(sock, ssl.SSLSocket) or sock.version() != "TLSv1.3":
            return  # TLS 1.2 ends the handshake with the alert: connect() raises it
        try:
            readable, _, _ = select.select([sock], [], [], min(_TLS_VERDICT_WAIT_S, self.settings.connect_timeout))
            if not readable:
                return  # a broker without session tickets: the alert, if one comes, may race CONNECT
            data = sock.recv(1)
        except ssl.SSLWantReadError:
            return  # only the session tickets: the broker accepted our certificate
        except OSError as e:  # the alert (ssl.SSLError), or a reset
            conn.tls_error = e
            return
        if data:  # a byte before CONNECT: not an MQTT broker; the stream is unusable now
            conn.tls_error = ssl.SSLError(f"{self.settings.host}:{self.settings.port} sent data before CONNECT")
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        else:
            conn.tls_error = ssl.SSLEOFError(
                ssl.SSL_ERROR_EOF, "the broker closed the connection right after the TLS handshake, without an alert"
            )

    def _close(self, conn: _Connection, timeout: float) -> None:
        """A clean DISCONNECT (no will); the socket is shut down if that does not end the connection in time."""
        with self._lock:
            conn.up = False
            self._up.clear()
        conn.client.disconnect()
        if not conn.ended.wait(timeout):
            self._abort(conn)

    def _abort(self, conn: _Connection) -> None:
        """End a connection that does not end by itself: shut the socket down under paho's network thread."""
        conn.aborted = True
        sock = conn.client.socket()
        if sock is not None:
            # Plain socket shutdown (not SSLSocket's, which would race with paho's thread on the TLS object): paho's
            # select wakes up, reads EOF and ends the connection through its usual path. OSError: already closed.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
        if not conn.ended.wait(2.0):
            conn.ended.set()  # paho's thread is gone or wedged; loop_stop() below must not wait for it forever

    def _end(self, conn: _Connection, error: TransportError) -> None:
        """The connection is over: fail every delivery still waiting for it (each exactly once)."""
        with self._lock:
            conn.up = False
            if self._conn is conn:
                self._up.clear()
            pending, conn.pending = conn.pending, {}
            conn.early.clear()
        conn.ended.set()
        for d in pending.values():
            d.fail(error)
        if pending:
            event(log, logging.WARNING, "deliveries failed with the connection", count=len(pending))

    # -- paho callbacks (network thread) ------------------------------------------------------------------------

    def _on_connect(self, conn: _Connection, session_present: bool, rc: ReasonCode, props: Properties) -> None:
        try:
            if rc.is_failure:
                conn.refused = rc.getName()
                return
            receive_max = getattr(props, "ReceiveMaximum", DEFAULT_RECEIVE_MAXIMUM)
            self._receive_maximum = int(receive_max)
            self._publish_birth(conn)
            if self._subscriptions:
                # Retain handling 1: retained messages only for a new subscription, not again on every reconnect.
                opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
                conn.client.subscribe([(f, opts) for f in self._subscriptions])
            with self._lock:
                conn.up = True
                self.connects += 1
                if self._conn is conn and not self._stopping.is_set():
                    self._up.set()
            event(
                log,
                logging.INFO,
                "connected",
                session_present=session_present,
                receive_maximum=self._receive_maximum,
                connects=self.connects,
            )
        except Exception:  # never let an error escape into paho's thread
            log.exception("on_connect failed")
        finally:
            conn.connack.set()

    def _publish_birth(self, conn: _Connection) -> None:
        if self._birth is None:
            return
        topic, payload = self._birth() if callable(self._birth) else self._birth
        with self._lock:
            conn.up = True  # queued on this connection before any caller can publish (``_up`` is still clear)
        d = self._publish_on(conn, topic, payload, 1, True)
        d.add_done_callback(lambda done: self._birth_done(conn, done))

    def _birth_done(self, conn: _Connection, d: Delivery) -> None:
        """A refused birth ends the session (``_run_connection`` closes it); a lost connection is not a refusal."""
        if d.ok or d.error is not None:
            return
        conn.birth_refused = d.reason or "refused"

    def _on_disconnect(self, conn: _Connection, rc: ReasonCode, from_server: bool) -> None:
        try:
            conn.disconnect_reason, conn.disconnect_from_server = rc.getName(), from_server
            event(log, logging.INFO, "disconnected", reason=rc.getName(), from_server=from_server)
            self._end(conn, TransportError(f"connection lost before the PUBACK ({rc.getName()})"))
        except Exception:
            log.exception("on_disconnect failed")

    def _on_publish(self, conn: _Connection, mid: int, rc: ReasonCode) -> None:
        try:
            ok, name, value = not rc.is_failure, rc.getName(), int(rc.value)
            if not ok:
                conn.refused_publish = True
            with self._lock:
                d = conn.pending.pop(mid, None)
                if d is None:
                    conn.early[mid] = (ok, name, value)
            if d is not None:
                d.resolve(ok=ok, reason=name, reason_code=value)
        except Exception:
            log.exception("on_publish failed")

    def _on_paho_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("message handler failed for %s", msg.topic)

    def _on_paho_incoming(self, conn: _Connection, msg: mqtt.MQTTMessage) -> None:
        assert self._on_incoming is not None
        try:
            self._on_incoming(
                Incoming(conn, mid=msg.mid, qos=msg.qos, topic=msg.topic, payload=bytes(msg.payload), duplicate=msg.dup)
            )
        except Exception:  # unacknowledged: the broker redelivers it after the next reconnect
            log.exception("message handler failed for %s", msg.topic)
