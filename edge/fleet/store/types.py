"""The gateway's storage: registered devices, verified envelopes, chain state, the work ledger, quarantine, status.

One ``Store`` protocol, two backends that share every rule (``_base.SqlStore``) and differ only in connection
handling, SQL dialect and locking: SQLite (the embedded default for one gateway, WAL) and PostgreSQL (several
gateway processes on one database). ``edge.fleet.store.open_store`` picks the backend from a URL.

Invariants:
- An envelope is stored at most once per (device, counter), as the exact bytes received, and only when the verifier
  accepted it (``first``, ``next``, ``gap``, ``late``); records are not stored one by one: their counts go to the
  ledger, and the bytes stay re-verifiable by anyone holding the device's did:key.
- ``ingest`` commits a whole batch or nothing. The chain head, the open holes, the envelopes and the ledger move
  together, so a crash or a database error never leaves the chain and the ledger disagreeing; the caller acks the
  broker only after ``ingest`` returned, so an uncommitted batch is redelivered and verified again.
- Calls for one device serialise on its chain row (PostgreSQL ``SELECT .. FOR UPDATE``, rows locked in sorted
  order so two workers never deadlock; SQLite ``BEGIN IMMEDIATE``), so two gateway processes fed by an MQTT shared
  subscription never store an envelope twice nor see a false fork.
- Every ``EventRecord`` of an accepted envelope is also stored as a row of its own (``DeviceEvent``), in the same
  transaction as the envelope and at most once per (device, counter, index), so the fleet can query OTA transitions
  without decoding envelopes; a redelivered envelope adds none.
- Days are UTC days of the gateway's ``received_at``: device clocks are not trusted for accounting.
- Thread-safety: a ``Store`` holds one database connection and is not safe for concurrent use; give each thread
  (or worker process) its own ``Store``. Several stores on one database are safe: that is what the locking is for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge.fleet.credit import UNCREDITED
from edge.fleet.suspend import Suspension
from edge.wire.chain import Verdict

__all__ = [
    "DeviceEvent",
    "DeviceRecord",
    "DeviceStatus",
    "DeliveryState",
    "GatewayHeartbeat",
    "Inbound",
    "IngestResult",
    "LedgerRow",
    "Store",
    "StoredEnvelope",
]


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A registered device.

    Attributes:
        device_id: the device id (an MQTT topic level: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``).
        did: the did:key of the device's Ed25519 key.
        public_key: the raw 32-byte Ed25519 public key (must be the key ``did`` names).
        cert_pem: the certificate the fleet CA issued.
        enrolled_at: when it was registered (epoch seconds).
        revoked_at: when it was revoked, else None; its envelopes received from then on are rejected.
    """

    device_id: str
    did: str
    public_key: bytes
    cert_pem: str
    enrolled_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    """One MQTT message as the ingest loop received it.

    Attributes:
        topic: the topic as received, e.g. ``devices/cam-1/telemetry``.
        payload: the message bytes (an envelope, if the device behaves).
        received_at: the gateway's clock at receipt (epoch seconds); the caller supplies it.
    """

    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class IngestResult:
    """The outcome of one inbound message.

    Attributes:
        verdict: for a telemetry message, the verifier's classification (``edge.wire.chain.Verdict``);
            None for any other message.
        stored: True when what the message carries is stored after the call: an envelope accepted now or a
            duplicate of one stored before, a status recorded (or superseded by a later status of the same device
            in the same batch, or an empty retained message that clears it). False: the message went to
            quarantine with ``outcome`` as its kind.
        outcome: the verdict's kind for telemetry; ``recorded``, ``superseded`` or ``cleared`` for a status;
            otherwise the quarantine kind (``malformed``, ``wrong_topic``, ``internal``, ``shed``).
        device_id: the device the message is attributed to: the one whose topic it arrived on (the broker lets
            only that device write it), never an id the message claims inside; None for a topic that names none.
    """

    verdict: Verdict | None
    stored: bool
    outcome: str = ""
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """The verified work of one device on one UTC day (by the gateway's ``received_at``).

    Attributes:
        device_id: the device.
        day: ``YYYY-MM-DD``.
        envelopes: accepted envelopes.
        records: records in them (every type).
        inferences: inference records by model id (``name@version``).
        readings: reading records.
        events: event records.
        missing: counters skipped by gaps opened that day, minus those of them filled late since.
        late: envelopes received that day that arrived late and filled a gap.
        duplicates: redelivered or replayed copies of stored envelopes (not stored again).
        rejects: quarantined inputs that arrived on this device's topics (attributed by topic, never by content).
        announced_lost: envelopes the device itself reported dropped (each dropped counter once).
        announced_lost_records: the records those envelopes held, by the device's word.
        credits: what became of the inferences, per model and outcome (``edge.fleet.credit.Outcome`` values):
            ``credited`` is the work the device is paid for.
    """

    device_id: str
    day: str
    envelopes: int
    records: int
    inferences: dict[str, int]
    readings: int
    events: int
    missing: int
    late: int
    duplicates: int
    rejects: int
    announced_lost: int
    announced_lost_records: int = 0
    credits: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def claimed(self) -> int:
        """Inference records in the day's accepted envelopes."""
        return sum(self.inferences.values())

    @property
    def credited(self) -> int:
        """Inferences credited (the work the device is paid for)."""
        return sum(by.get("credited", 0) for by in self.credits.values())

    def uncredited(self) -> dict[str, int]:
        """Inferences not credited, by reason (every reason present, zero when none)."""
        return {o.value: sum(by.get(o.value, 0) for by in self.credits.values()) for o in UNCREDITED}


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """What the gateway knows about a device's liveness.

    Attributes:
        device_id: the device.
        state: ``online`` or ``offline`` from its last status message, ``unknown`` if it never sent one.
        reason: the offline reason from the status message (``lost``, ``shutdown``), else None.
        since: when the state last changed (gateway clock), None if never heard.
        last_seen: the last status message or accepted envelope (gateway clock), None if never heard.
        last_counter: the head of its chain, None before its first accepted envelope.
        gaps: open missing counters (skipped by gaps, not filled late).
        rejects: quarantined inputs attributed to it, all days.
        model: the model id from its last status that named one (the birth message), else None.
        outbox_backlog: envelopes still waiting in its outbox as far as the fleet can tell: the backlog of its latest
            status that reported one, less the envelopes accepted since (a lower bound while it is offline); else
            None.
        info: the last status payload as received (a JSON object; empty if none).
        revoked_at: when it was revoked (gateway clock), None while it is not.
        backlog_reported: the backlog its latest status reported, None if none did.
        backlog_reported_at: when that status arrived (gateway clock).
    """

    device_id: str
    state: str
    reason: str | None
    since: float | None
    last_seen: float | None
    last_counter: int | None
    gaps: int
    rejects: int
    model: str | None
    outbox_backlog: int | None
    info: dict[str, Any]
    revoked_at: float | None = None
    backlog_reported: int | None = None
    backlog_reported_at: float | None = None


@dataclass(frozen=True, slots=True)
class GatewayHeartbeat:
    """A gateway process's sign of life in the store (``edge.fleet.heartbeat`` writes it every few seconds).

    Attributes:
        gateway_id: the gateway's identity (``[gateway] id``).
        host: the host name it runs on.
        pid: its process id.
        started_at: when the process started (its clock).
        at: the latest beat (its clock).
        connected: whether it was connected to the broker at that beat.
        stopped_at: when it stopped cleanly, None while running (or after a crash).
    """

    gateway_id: str
    host: str
    pid: int
    started_at: float
    at: float
    connected: bool
    stopped_at: float | None = None


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """An accepted envelope as stored.

    Attributes:
        device_id: the device.
        counter: its counter.
        hash: SHA-256 of ``data`` (the chain hash).
        prev: the prev hash it carried.
        received_at: when the gateway received it.
        data: the exact bytes received (re-verifiable with the device's key).
        credit: None when every inference record in it was credited, else the JSON of the uncredited records'
            indices by outcome (``edge.fleet.credit.Resolution.exceptions``).
    """

    device_id: str
    counter: int
    hash: bytes
    prev: bytes
    received_at: float
    data: bytes
    credit: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """What the store holds of one device's chain, as a receipt states it (``edge.wire.receipts``).

    Attributes:
        stored: every counter ``1 .. stored`` is stored.
        stored_hash: the hash of envelope ``stored`` (32 zero bytes for 0).
        head: the highest counter stored (0: none).
        head_hash: its hash.
        missing: the open missing ranges above ``stored``, ascending: at most ``MAX_HOLES + 1``, the highest ones.
    """

    stored: int
    stored_hash: bytes
    head: int
    head_hash: bytes
    missing: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """An event record of an accepted envelope, as stored.

    Attributes:
        device_id: the device that signed it.
        counter: the counter of the envelope that carried it.
        ts: the event's own timestamp (the box's clock: indicative only).
        received_at: when the gateway received the envelope (gateway clock; queries use this one).
        kind: the dotted kind, e.g. ``ota.committed``.
        data: its data; byte values are stored as lower-case hex strings (JSON has no bytes).
    """

    device_id: str
    counter: int
    ts: float
    received_at: float
    kind: str
    data: dict[str, Any]


class Store(Protocol):
    """The gateway's storage; both backends implement it. Not safe for concurrent use: one ``Store`` per thread."""

    url: str

    def add_device(self, device: DeviceRecord) -> None:
        """Register a device.

        Args:
            device: the record; ``did`` must name ``public_key``.

        Raises:
            DeviceExistsError: a device with this id exists (revoked or not).
            GatewayInputError: invalid id, key, did:key or times.
            StoreError: the database failed.
        """

    def device(self, device_id: str) -> DeviceRecord | None:
        """The device with this id (revoked ones included), or None.

        Raises:
            StoreError: the database failed.
        """

    def devices(self) -> list[DeviceRecord]:
        """Every registered device (revoked ones included), ordered by id.

        Raises:
            StoreError: the database failed.
        """

    def revoke_device(self, device_id: str, at: float) -> DeviceRecord:
        """Revoke a device from ``at`` on; idempotent (a second call keeps the first time).

        Args:
            device_id: the device.
            at: the revocation time (epoch seconds, gateway clock).

        Returns:
            The device record after the call.

        Raises:
            UnknownDeviceError: no such device.
            StoreError: the database failed.
        """

    def renew_device(self, device_id: str, cert_pem: str) -> DeviceRecord:
        """Replace an active device's certificate with a renewed one (same key, same id).

        Args:
            device_id: the device.
            cert_pem: its new certificate (PEM).

        Returns:
            The device record after the call.

        Raises:
            UnknownDeviceError: no such device, or it is revoked (a revoked device is never renewed).
            GatewayInputError: the certificate is not text.
            StoreError: the database failed.
        """

    def ingest(self, batch: Sequence[Inbound]) -> list[IngestResult]:
        """Verify and store a batch of messages (telemetry and status) in one transaction.

        Args:
            batch: messages in the order received.

        Returns:
            One result per message, in order. Bad input never raises: it gets a reject result and a quarantine row.

        Raises:
            StoreUnavailableError: the database could not be reached or was busy; nothing was committed: retry.
            StoreError: the batch could not be stored (nothing was committed); retried alone, each message either
                stores or fails again, and a message that fails alone should be quarantined (``quarantine``).
                The caller must not acknowledge what was not committed.
        """

    def quarantine(self, batch: Sequence[Inbound], kind: str, reason: str) -> None:
        """Quarantine messages without verifying them (handling them failed in a way nobody expected).

        Each gets a quarantine row of ``kind`` with its complete payload (bounded by the envelope size limit), so it
        can be examined and re-ingested; a registered device whose topic it arrived on gets a reject on its ledger.

        Raises:
            StoreError: the database failed (``StoreUnavailableError``: it may succeed later).
        """

    def record_status(self, device_id: str, status: Mapping[str, Any], at: float) -> None:
        """Store a device's latest status message (``devices/<id>/status``), registered or not.

        Raises:
            GatewayInputError: invalid device id, or a status that is not a JSON object of bounded size.
            StoreError: the database failed.
        """

    def delivery_states(self, device_ids: Sequence[str]) -> dict[str, DeliveryState]:
        """What is stored of each registered device's chain, for its receipt; unregistered ids are left out.

        Raises:
            StoreError: the database failed (``StoreUnavailableError``: it may succeed later).
        """

    def statuses(self) -> list[DeviceStatus]:
        """The status of every registered device, ordered by id (strangers: ``strangers()``).

        Raises:
            StoreError: the database failed.
        """

    def beat(self, heartbeat: GatewayHeartbeat) -> None:
        """Record a gateway's heartbeat (replacing its previous one).

        Raises:
            StoreError: the database failed.
        """

    def heartbeats(self) -> list[GatewayHeartbeat]:
        """Every gateway's latest heartbeat, newest first.

        Raises:
            StoreError: the database failed.
        """

    def strangers(self) -> list[DeviceStatus]:
        """Status messages from device ids that are not registered, ordered by id.

        Raises:
            StoreError: the database failed.
        """

    def ledger(
        self, *, device_id: str | None = None, day_from: str | None = None, day_to: str | None = None
    ) -> list[LedgerRow]:
        """Ledger rows, ordered by (device, day); the day bounds are inclusive.

        Raises:
            GatewayInputError: a day is not ``YYYY-MM-DD``.
            StoreError: the database failed.
        """

    def envelopes(
        self, device_id: str, *, day_from: str | None = None, day_to: str | None = None, from_counter: int = 0
    ) -> Iterator[StoredEnvelope]:
        """Stored envelopes of a device in counter order, streamed in pages.

        Raises:
            GatewayInputError: a day is not ``YYYY-MM-DD``.
            StoreError: the database failed.
        """

    def credit_caps(self, device_id: str) -> dict[tuple[str, int], int]:
        """The cap of every (model id, UTC hour) in which the device has credited inferences (``credit_hours``).

        Raises:
            StoreError: the database failed.
        """

    def events(
        self, *, kind_prefix: str = "", since: float = 0.0, device_id: str | None = None, limit: int = 10000
    ) -> list[DeviceEvent]:
        """Stored events, oldest first by (received_at, device, counter, index).

        Args:
            kind_prefix: only kinds starting with this (``"ota."``); empty: every kind.
            since: only events received at or after this time (gateway clock, epoch seconds).
            device_id: only this device's.
            limit: the most rows returned (the oldest ones); at least 0.

        Raises:
            GatewayInputError: ``since`` is not epoch seconds, or ``limit`` is negative.
            StoreError: the database failed.
        """

    def suspend(self, device_id: str, *, now: float, base_s: float, reason: str, by: str) -> Suspension | None:
        """Suspend a registered device (``edge.fleet.suspend``) unless a suspension is in force already.

        Args:
            device_id: the device.
            now: the gateway clock.
            base_s: the first suspension's length; a repeat within a day of the last one's end doubles it.
            reason: why, for the operator (bounded and stored as given).
            by: the deciding gateway's id.

        Returns:
            The suspension in force after the call (the existing one, if any); None for an unregistered device.

        Raises:
            StoreError: the database failed.
        """

    def resume(self, device_id: str, *, now: float) -> Suspension | None:
        """End the device's suspension at ``now`` (an operator's decision); its strikes are kept.

        Returns:
            The suspension as ended, or None if none was in force.

        Raises:
            StoreError: the database failed.
        """

    def suspensions(self, *, now: float | None = None) -> list[Suspension]:
        """The last suspension of every device ever suspended, ordered by device; only those in force at ``now``
        when given.

        Raises:
            StoreError: the database failed.
        """

    def quarantine_counts(self) -> dict[str, int]:
        """Rejected inputs by kind (``VerdictKind`` values).

        Raises:
            StoreError: the database failed.
        """

    def quarantined(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The newest quarantined inputs first: time, topic, device, kind, reason, size, hash (hex or None).

        Raises:
            StoreError: the database failed.
        """

    def close(self) -> None:
        """Close the connection; idempotent."""
