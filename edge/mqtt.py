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
import logging
import random
import socket
import ssl
import threading
import time
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
from edge.log import event

__all__ = ["NO_MATCHING_SUBSCRIBERS", "Backoff", "Delivery", "Incoming", "MqttSettings", "MqttTransport"]

log = logging.getLogger("edge.mqtt")

# MQTT 5: Receive Maximum defaults to 65535 when the CONNACK does not carry one.
DEFAULT_RECEIVE_MAXIMUM: Final = 65535
# MQTT 5 reason code: the broker accepted the PUBLISH but no subscription matched it, so nobody will receive it.
NO_MATCHING_SUBSCRIBERS: Final = 0x10
_POLL_S: Final = 0.05  # how soon the supervisor notices stop(): it also bounds stop()'s latency


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
        if self.connect_timeout <= 0:
            raise ConfigError("mqtt.connect_timeout", self.connect_timeout, "> 0 seconds")
        if not 0 <= self.receive_maximum <= 65535:
            raise ConfigError("mqtt.receive_maximum", self.receive_maximum, "0..65535 (0: the protocol default)")


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(max, min * 2**n)) seconds.

    Full jitter spreads a fleet that lost its broker at the same moment over the whole interval, so the broker is
    not hit by every box at once when it comes back.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        """Create a backoff policy.

        Args:
            minimum: the ceiling of the first delay (seconds, > 0).
            maximum: the largest ceiling (seconds, >= minimum).
            rng: the random source (seeded in tests); a fresh ``random.Random`` by default.
        """
        self.minimum = minimum
        self.maximum = maximum
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not cryptography

    def ceiling(self, attempt: int) -> float:
        """The largest delay of ``attempt`` (0-based): ``min(maximum, minimum * 2**attempt)``."""
        return min(self.maximum, self.minimum * 2.0 ** min(attempt, 62))

    def delay(self, attempt: int) -> float:
        """A delay for ``attempt`` (0-based), uniform in ``[0, ceiling(attempt)]``.

        Args:
            attempt: how many attempts failed in a row before this wait.

        Returns:
            Seconds to wait.
        """
        return self._rng.uniform(0.0, self.ceiling(attempt))


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
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._up = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.connects = 0  # successful CONNACKs so far
        self.attempts = 0  # connection attempts so far

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
        s = self.settings
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(s.cert), str(s.key))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                "mqtt.tls", f"{s.ca}, {s.cert}, {s.key}", f"a readable CA, certificate and key ({e})"
            ) from e
        return ctx

    def _supervise(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self.attempts += 1
            try:
                came_up = self._run_connection()
            except Exception:  # the loop must outlive any single failure; it is logged with its traceback
                log.exception("connection attempt failed unexpectedly")
                came_up = False
            if self._stopping.is_set():
                break
            # Reset on a successful CONNACK: a broker restart should cost one short wait, not the accumulated one.
            attempt = 0 if came_up else attempt + 1
            delay = self.backoff.delay(attempt)
            event(log, logging.INFO, "reconnecting", delay_s=round(delay, 3), attempt=attempt)
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
        # paho's own logger stays off: it reports every ordinary connection loss at ERROR level; our "connected" and
        # "disconnected" events carry the reason codes instead.
        client.tls_set_context(self._tls_context())
        client.connect_timeout = s.connect_timeout
        client.max_inflight_messages_set(s.inflight)
        client.max_queued_messages_set(0)
        if self._will is not None:
            topic, payload, retain = self._will
            client.will_set(topic, payload, qos=1, retain=retain)
        return client

    def _run_connection(self) -> bool:
        """One connection from CONNECT to its end. Returns whether it reached CONNACK success."""
        s = self.settings
        try:
            client = self._new_client()
        except ConfigError as e:
            event(log, logging.ERROR, "cannot load TLS credentials", error=str(e))
            return False
        with self._lock:
            conn = _Connection(client)
            self._conn = conn
        client.on_connect = lambda _c, _u, flags, rc, props: self._on_connect(conn, flags.session_present, rc, props)
        client.on_disconnect = lambda _c, _u, _f, rc, _p: self._on_disconnect(conn, rc)
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
            event(log, logging.WARNING, "connect failed", host=s.host, port=s.port, error=str(e))
            self._end(conn, TransportError(f"connect to {s.host}:{s.port} failed: {e}"))
            return False
        client.loop_start()
        connack_deadline = time.monotonic() + s.connect_timeout
        try:
            while not conn.ended.wait(_POLL_S):
                if self._stopping.is_set():
                    self._close(conn, s.connect_timeout)
                    break
                if not conn.connack.is_set() and time.monotonic() > connack_deadline:
                    event(log, logging.WARNING, "no CONNACK", timeout_s=s.connect_timeout)
                    self._abort(conn)
                    break
        finally:
            if not conn.ended.wait(s.connect_timeout):
                self._abort(conn)
            client.loop_stop()
            why = "the transport stopped" if self._stopping.is_set() else "the connection was lost"
            self._end(conn, TransportError(f"{why} before the PUBACK ({s.host}:{s.port})"))
        if conn.refused is not None:
            event(log, logging.ERROR, "connection refused", reason=conn.refused)
        return conn.connack.is_set() and conn.refused is None

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
        d.add_done_callback(_log_birth)

    def _on_disconnect(self, conn: _Connection, rc: ReasonCode) -> None:
        try:
            event(log, logging.INFO, "disconnected", reason=rc.getName())
            self._end(conn, TransportError(f"connection lost before the PUBACK ({rc.getName()})"))
        except Exception:
            log.exception("on_disconnect failed")

    def _on_publish(self, conn: _Connection, mid: int, rc: ReasonCode) -> None:
        try:
            ok, name, value = not rc.is_failure, rc.getName(), int(rc.value)
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


def _log_birth(d: Delivery) -> None:
    if not d.ok:
        event(log, logging.ERROR, "birth message not accepted", topic=d.topic, reason=d.reason)
