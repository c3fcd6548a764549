"""The ingest rules, sans-IO: what each inbound message does to the store, as a ``Plan`` the store executes.

The store (``_base.SqlStore``) routes a message by its topic (``edge.wire.topics.topic_route``), verifies telemetry
(``edge.wire.chain.ChainVerifier``) and hands the route and the verdict here; ``IngestPlanner`` answers with a
``Plan``: whether the envelope is stored, which ledger column of the sender grows, what goes to quarantine and why,
and the ``IngestResult`` the caller sees. The store then writes what the plans say and decides nothing itself.

The rules:
- ``first``, ``next``, ``gap`` and ``late`` store the envelope (``late`` also counts on the ledger as late); the store
  then counts its records, credits its inferences and keeps its event records. The missing counters of a gap or a
  late fill are the chain state's (``_batch.BatchState``), counted while the verifier advances the chain.
- ``duplicate`` stores nothing and counts one ``duplicates``: the envelope is stored already, so it is not an error.
- Every other verdict, a message on a topic that is neither ``devices/<id>/telemetry`` nor ``devices/<id>/status``,
  and a status message that does not parse go to quarantine, with the verdict's kind (``malformed`` for a status) and
  its reason; they count one ``rejects`` for the device of the topic, if it is registered.
- A status message is parsed under bounds (``_status``); the last valid one of each device in the batch is stored,
  earlier ones become ``superseded``; an empty one (a retained status cleared) records nothing.

Invariants:
- A message is attributed to the device of its topic (the identity the broker authenticated: only that device may
  write there), never to an id its content claims: a box cannot get its forgeries counted against another box. A
  reason says which device the content names when that is not the topic's.
- A plan that stores an envelope, and every plan of the common path, is a module constant: planning an envelope that
  extends its chain allocates nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from edge.fleet.errors import GatewayInputError
from edge.fleet.store._batch import DeviceKey
from edge.fleet.store._checks import iso
from edge.fleet.store._status import StatusRow, decode_status, parse_status
from edge.fleet.store.types import Inbound
from edge.wire.chain import Verdict, VerdictKind
from edge.wire.envelope import envelope_hash
from edge.wire.schema import EventRecord, TelemetryLimits

__all__ = [
    "CLEARED",
    "QUARANTINE_PAYLOAD_BYTES",
    "SUPERSEDED",
    "IngestPlanner",
    "Plan",
    "Registry",
    "event_rows",
    "quarantine_row",
]

V = VerdictKind

QUARANTINE_PAYLOAD_BYTES: Final = 64 * 1024
_MAX_TOPIC_CHARS: Final = 1024
_MAX_REASON_CHARS: Final = 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """What one inbound message does to the store.

    Attributes:
        stored: ``IngestResult.stored``: what the message carries is stored after the batch (now or before).
        outcome: ``IngestResult.outcome``.
        accept: store the envelope, count it and its records on the ledger, credit its inferences, keep its events.
        late: an accepted envelope that filled a hole (the ledger's ``late``).
        count: a ledger column (``LEDGER_COUNTERS``) that grows by one for the device of the topic, or None.
        quarantine: the quarantine kind, or None: nothing is quarantined.
        reason: the quarantine reason.
        envelope_hash: the quarantine row's hash of the input (None when over the size limit or not verified).
        keep: at most this many bytes of the payload go to the quarantine row.
        verdict: the verdict the caller sees when it is not the verifier's (a revoked device, a wrong topic);
            None: the verifier's, or none for a status message.
        supersedes: the batch position of an earlier status of the same device that this one replaces, or None.
    """

    stored: bool
    outcome: str
    accept: bool = False
    late: bool = False
    count: str | None = None
    quarantine: str | None = None
    reason: str = ""
    envelope_hash: bytes | None = None
    keep: int = QUARANTINE_PAYLOAD_BYTES
    verdict: Verdict | None = None
    supersedes: int | None = None


# The plans of the verdicts whose plan depends on nothing but the kind: the common path looks them up, builds none.
_KIND_PLANS: Final[dict[VerdictKind, Plan]] = {
    V.FIRST: Plan(stored=True, outcome=V.FIRST.value, accept=True),
    V.NEXT: Plan(stored=True, outcome=V.NEXT.value, accept=True),
    V.GAP: Plan(stored=True, outcome=V.GAP.value, accept=True),
    V.LATE: Plan(stored=True, outcome=V.LATE.value, accept=True, late=True),
    V.DUPLICATE: Plan(stored=True, outcome=V.DUPLICATE.value, count="duplicates"),
}
RECORDED: Final = Plan(stored=True, outcome="recorded")
SUPERSEDED: Final = Plan(stored=True, outcome="superseded")
CLEARED: Final = Plan(stored=True, outcome="cleared")


class Registry(Protocol):
    """The registered devices, as the rules read them (the batch's ``BatchState`` inside the store)."""

    def device(self, device_id: str) -> DeviceKey | None:
        """The registered device (revoked or not), or None."""


class IngestPlanner:
    """Plans the messages of one batch in order (see the module docstring); holds the batch's latest statuses.

    Registration is read through ``registry`` only when a rule needs it (a reject, an unknown device), so a batch of
    good envelopes reads no device beyond those the verifier looked up.
    """

    def __init__(self, registry: Registry, limits: TelemetryLimits) -> None:
        """Create the planner of one batch.

        Args:
            registry: the registered devices.
            limits: the telemetry limits (the size above which an input gets no hash).
        """
        self._registry = registry
        self._limits = limits
        self._statuses: dict[str, tuple[int, StatusRow]] = {}

    def telemetry(self, verdict: Verdict, device_id: str, received_at: float) -> Plan:
        """The plan of a message on ``devices/<device_id>/telemetry``, given the verifier's verdict.

        Args:
            verdict: the verifier's verdict (verified with ``topic_device=device_id``).
            device_id: the device of the topic.
            received_at: the gateway's receipt time.
        """
        plan = _KIND_PLANS.get(verdict.kind)
        if plan is not None:
            return plan
        if verdict.kind is V.UNKNOWN_DEVICE:
            verdict = self._explain_revoked(verdict, received_at)
        return self._reject(verdict, device_id)

    def other(self, topic: object, payload: object, device_id: str | None) -> Plan:
        """The plan of a message on any other topic: ``wrong_topic``, with nothing verified.

        Args:
            topic: the topic as received.
            payload: the message as received.
            device_id: the device whose namespace the topic is in, or None (``topic_route``).
        """
        h = None
        if isinstance(payload, bytes) and len(payload) <= self._limits.max_envelope_bytes:
            h = envelope_hash(payload)
        reason = f"topic {str(topic)!r:.120} is not devices/<device id>/telemetry or /status"
        return self._reject(Verdict(V.WRONG_TOPIC, reason, None, envelope_hash=h), device_id)

    def status(self, position: int, device_id: str, payload: bytes, received_at: float) -> Plan:
        """The plan of a message on ``devices/<device_id>/status``.

        Args:
            position: the message's position in the batch (a later status of the device supersedes it).
            device_id: the device of the topic.
            payload: the message as received.
            received_at: the gateway's receipt time.
        """
        try:
            body = decode_status(device_id, payload)
            if body is None:
                return CLEARED
            row = parse_status(device_id, body, received_at)
        except GatewayInputError as e:
            return Plan(
                stored=False,
                outcome="malformed",
                count=self._rejects(device_id),
                quarantine="malformed",
                reason=f"status: {e}",
            )
        previous = self._statuses.get(device_id)
        self._statuses[device_id] = (position, row)
        return RECORDED if previous is None else dataclasses.replace(RECORDED, supersedes=previous[0])

    def statuses(self) -> list[tuple[str, StatusRow]]:
        """The status to store per device, sorted by device (the order concurrent batches take their row locks)."""
        return [(dev, row) for dev, (_position, row) in sorted(self._statuses.items())]

    def held(self, device_id: str | None, payload: object, kind: str, reason: str) -> Plan:
        """The plan of a message the caller quarantines unverified (``Store.quarantine``), its payload kept whole.

        Args:
            device_id: the device whose namespace the topic is in, or None (``topic_route``).
            payload: the message as received.
            kind: the quarantine kind.
            reason: why.
        """
        data = payload if isinstance(payload, bytes) else b""
        limit = self._limits.max_envelope_bytes
        return Plan(
            stored=False,
            outcome=kind,
            count=self._rejects(device_id),
            quarantine=kind,
            reason=reason,
            envelope_hash=envelope_hash(data) if len(data) <= limit else None,
            keep=limit,
        )

    def _reject(self, v: Verdict, who: str | None) -> Plan:
        return Plan(
            stored=False,
            outcome=v.kind.value,
            count=self._rejects(who),
            quarantine=v.kind.value,
            reason=_reason(v, who),
            envelope_hash=v.envelope_hash,
            verdict=v,
        )

    def _rejects(self, who: str | None) -> str | None:
        # Only a registered device has a ledger: rejects on a stranger's topic are quarantined, not counted.
        return "rejects" if who is not None and self._registry.device(who) is not None else None

    def _explain_revoked(self, v: Verdict, received_at: float) -> Verdict:
        """Say "revoked" in the reason when the unknown device is a registered, revoked one."""
        dev = self._registry.device(v.device_id) if v.device_id is not None else None
        if dev is None or dev.revoked_at is None:
            return v
        reason = f"device {v.device_id!r} was revoked at {iso(dev.revoked_at)}; envelope received at {iso(received_at)}"
        return dataclasses.replace(v, reason=reason)


def _reason(v: Verdict, who: str | None) -> str:
    """The verdict's reason, saying which device the content claims when that is not the topic's device."""
    if v.device_id is not None and v.device_id != who:
        return f"{v.reason} (the envelope names {v.device_id!r})"
    return v.reason


def quarantine_row(msg: Inbound, device_id: str | None, plan: Plan) -> tuple[object, ...]:
    """The ``quarantine`` row of a message whose plan quarantines it.

    Args:
        msg: the message.
        device_id: the device of its topic, or None.
        plan: its plan (``plan.quarantine`` is not None).

    Returns:
        (received_at, topic, device_id, kind, reason, size, hash, data), topic and reason bounded.
    """
    data = msg.payload if isinstance(msg.payload, bytes) else b""
    topic = msg.topic if isinstance(msg.topic, str) else repr(msg.topic)
    # Text columns never get a NUL (PostgreSQL refuses it, and the whole batch with it).
    return (
        float(msg.received_at),
        topic[:_MAX_TOPIC_CHARS].replace("\x00", "\\x00"),
        device_id,
        plan.quarantine,
        plan.reason[:_MAX_REASON_CHARS].replace("\x00", "\\x00"),
        len(data),
        plan.envelope_hash,
        data[: plan.keep],
    )


def event_rows(device_id: str, counter: int, received_at: float, records: Sequence[object]) -> list[tuple[object, ...]]:
    """The ``events`` rows of an accepted envelope's event records; ``idx`` is the record's index in the envelope."""
    return [
        (
            device_id,
            counter,
            i,
            r.timestamp,
            received_at,
            r.kind,
            json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in r.data.items()}, sort_keys=True),
        )
        for i, r in enumerate(records)
        if type(r) is EventRecord
    ]
