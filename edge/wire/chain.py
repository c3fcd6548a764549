"""The gateway's envelope verifier: every input gets exactly one verdict; the chain state moves only on acceptance.

Checks, in order (each stops a named attack; the first that fails decides the verdict):

1. size, COSE structure, canonical encoding, alg EdDSA, kid = device id  -> ``malformed`` (garbage, oversize, depth
   bombs, algorithm substitution, re-encoded copies)
2. key lookup for the kid                                  -> ``unknown_device`` (unregistered or revoked devices)
3. signature over the raw bytes, before any payload decoding -> ``bad_signature`` (forgery, tampering)
4. kid device = the device of the MQTT topic              -> ``wrong_topic`` (A's envelope republished on B's topic)
5. payload and records against the schema and limits      -> ``malformed`` (a signed but invalid payload)
6. the chain, for counter c and hash h against the device's head (last accepted counter and hash):
   - no head yet                                -> ``first`` (accepted, any counter; counters 1 .. c - 1 become
     missing, ``missing = c - 1``, so they can still arrive ``late``)
   - c = head + 1 and prev = head hash          -> ``next`` (accepted)
   - c = head + 1 and prev != head hash         -> ``forked`` (a second history or a replayed branch)
   - c > head + 1                               -> ``gap`` (accepted, ``missing = c - head - 1``; the skipped counters
     are remembered as missing)
   - c <= head, the envelope at c is known      -> ``duplicate`` if h equals it (QoS 1 redelivery, replay of a
     stored envelope), else ``forked`` (the device signed two envelopes with one counter)
   - c < head, c was skipped by a gap           -> ``late`` (accepted: a reordered envelope filling the hole; its
     prev must match the known envelope at c - 1 and the known envelope at c + 1 must name it as prev, else
     ``forked``). Reordering is normal with MQTT shared subscriptions across ingest workers, so a late envelope is
     data, not an attack; it is accepted only into a hole that a gap opened, never over history.
   - c < head otherwise                         -> ``stale`` (below the head and not a known hole: a replay of an
     envelope whose hash the store no longer keeps)

Only ``first``, ``next``, ``gap`` and ``late`` change the state. The verifier is sans-IO: keys and chain state come
through two small protocols the gateway implements over its registry and database. Calls for one device must be
serialised (one ingest worker per device, or a transaction around ``verify``): the chain check reads then writes.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.wire.envelope import Envelope, envelope_hash, parse_envelope, read_payload
from edge.wire.errors import BadSignatureError, MalformedEnvelopeError, MalformedRecordError
from edge.wire.schema import DEFAULT_LIMITS, TelemetryLimits, TelemetryRecord

__all__ = [
    "ChainLink",
    "ChainStateStore",
    "ChainVerifier",
    "KeyLookup",
    "MemoryChainState",
    "Verdict",
    "VerdictKind",
]


class VerdictKind(enum.StrEnum):
    """The classification of one input."""

    NEXT = "next"
    FIRST = "first"
    GAP = "gap"
    LATE = "late"
    DUPLICATE = "duplicate"
    FORKED = "forked"
    STALE = "stale"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_DEVICE = "unknown_device"
    WRONG_TOPIC = "wrong_topic"
    MALFORMED = "malformed"


ACCEPTED = frozenset({VerdictKind.FIRST, VerdictKind.NEXT, VerdictKind.GAP, VerdictKind.LATE})


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One accepted envelope as the chain remembers it.

    Attributes:
        counter: its counter.
        hash: ``envelope_hash`` of its bytes.
        prev: the prev hash it carried.
    """

    counter: int
    hash: bytes
    prev: bytes


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of verifying one input.

    Attributes:
        kind: the classification.
        reason: a human-readable explanation (for logs and rejection counters).
        device_id: the kid's device when the header could be read, else None.
        counter: the envelope counter when the payload was decoded, else None.
        envelope_hash: SHA-256 of the input when it was within the size limit, else None.
        missing: for ``gap`` (and ``first`` above counter 1), how many envelopes were skipped; else 0.
        records: the records, only for accepted verdicts.
        envelope: the decoded envelope when the signature verified and the payload was valid, else None.
    """

    kind: VerdictKind
    reason: str
    device_id: str | None = None
    counter: int | None = None
    envelope_hash: bytes | None = None
    missing: int = 0
    records: tuple[TelemetryRecord, ...] = field(default=())
    envelope: Envelope | None = None

    @property
    def accepted(self) -> bool:
        """True for ``first``, ``next``, ``gap`` and ``late``: the records are authentic, new and stored."""
        return self.kind in ACCEPTED


class KeyLookup(Protocol):
    """The device registry as the verifier sees it."""

    def lookup(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's current public key, or None for an unknown or revoked device."""


class ChainStateStore(Protocol):
    """Per-device chain state; the gateway implements it over its database."""

    def head(self, device_id: str) -> ChainLink | None:
        """The accepted envelope with the highest counter, or None if none was accepted yet."""

    def link_at(self, device_id: str, counter: int) -> ChainLink | None:
        """The accepted envelope at ``counter`` if still remembered (the head always is), else None."""

    def is_missing(self, device_id: str, counter: int) -> bool:
        """Whether ``counter`` was skipped by an accepted gap and has not been filled since."""

    def advance(self, device_id: str, link: ChainLink, *, missing_from: int | None) -> None:
        """Make ``link`` the new head; counters ``missing_from .. link.counter - 1`` (if given) become missing."""

    def fill(self, device_id: str, link: ChainLink) -> None:
        """Record a late envelope below the head; its counter is no longer missing."""


class MemoryChainState:
    """An in-memory ``ChainStateStore`` with bounded memory per device.

    It remembers the last ``history`` accepted links and at most ``max_gaps`` open holes per device; a hole beyond
    that is forgotten (its counters become ``stale``), and a link beyond that is forgotten (a replay of it is
    ``stale`` rather than ``duplicate``). Both are rejections either way.
    """

    def __init__(self, *, history: int = 4096, max_gaps: int = 256) -> None:
        """Create an empty state.

        Args:
            history: links remembered per device (>= 1).
            max_gaps: open holes (ranges of missing counters) remembered per device (>= 1).
        """
        self._history = max(1, history)
        self._max_gaps = max(1, max_gaps)
        self._heads: dict[str, ChainLink] = {}
        self._links: dict[str, OrderedDict[int, ChainLink]] = {}
        self._gaps: dict[str, list[tuple[int, int]]] = {}

    def head(self, device_id: str) -> ChainLink | None:
        return self._heads.get(device_id)

    def link_at(self, device_id: str, counter: int) -> ChainLink | None:
        head = self._heads.get(device_id)
        if head is not None and head.counter == counter:
            return head
        return self._links.get(device_id, OrderedDict()).get(counter)

    def is_missing(self, device_id: str, counter: int) -> bool:
        return any(lo <= counter <= hi for lo, hi in self._gaps.get(device_id, ()))

    def advance(self, device_id: str, link: ChainLink, *, missing_from: int | None) -> None:
        self._heads[device_id] = link
        self._remember(device_id, link)
        if missing_from is not None and missing_from < link.counter:
            gaps = self._gaps.setdefault(device_id, [])
            gaps.append((missing_from, link.counter - 1))
            del gaps[: -self._max_gaps]

    def fill(self, device_id: str, link: ChainLink) -> None:
        self._remember(device_id, link)
        out = []
        for lo, hi in self._gaps.get(device_id, ()):
            if lo <= link.counter <= hi:
                out += [(a, b) for a, b in ((lo, link.counter - 1), (link.counter + 1, hi)) if a <= b]
            else:
                out.append((lo, hi))
        self._gaps[device_id] = out

    def _remember(self, device_id: str, link: ChainLink) -> None:
        links = self._links.setdefault(device_id, OrderedDict())
        links[link.counter] = link
        while len(links) > self._history:
            links.popitem(last=False)


class ChainVerifier:
    """Classifies envelopes (see the module docstring for the order of checks and the chain rules)."""

    def __init__(self, keys: KeyLookup, state: ChainStateStore, limits: TelemetryLimits = DEFAULT_LIMITS) -> None:
        """Create a verifier.

        Args:
            keys: the device registry.
            state: the chain state; updated only for accepted verdicts.
            limits: bounds on envelopes and records.
        """
        self._keys = keys
        self._state = state
        self._limits = limits

    def verify(self, data: bytes, *, topic_device: str | None = None) -> Verdict:
        """Classify one received envelope.

        Args:
            data: the bytes as received from the broker.
            topic_device: the device id of the MQTT topic it arrived on (``devices/<id>/telemetry``); None skips
                the topic check (e.g. for envelopes re-read from storage).

        Returns:
            The verdict; never raises for bad input.
        """
        h = envelope_hash(data) if isinstance(data, bytes) and len(data) <= self._limits.max_envelope_bytes else None
        try:
            device_id, msg = parse_envelope(data, self._limits)
        except MalformedEnvelopeError as e:
            return Verdict(VerdictKind.MALFORMED, str(e), envelope_hash=h)
        key = self._keys.lookup(device_id)
        if key is None:
            return Verdict(VerdictKind.UNKNOWN_DEVICE, f"no key for device {device_id!r}", device_id, envelope_hash=h)
        try:
            msg.verify(key)
        except BadSignatureError as e:
            return Verdict(VerdictKind.BAD_SIGNATURE, str(e), device_id, envelope_hash=h)
        if topic_device is not None and topic_device != device_id:
            return Verdict(
                VerdictKind.WRONG_TOPIC,
                f"envelope signed by {device_id!r} arrived on the topic of {topic_device!r}",
                device_id,
                envelope_hash=h,
            )
        assert h is not None  # parse_envelope enforced the size limit
        try:
            env = read_payload(msg.payload, device_id, h, self._limits)
        except (MalformedEnvelopeError, MalformedRecordError) as e:
            return Verdict(VerdictKind.MALFORMED, f"signed payload invalid: {e}", device_id, envelope_hash=h)
        return self._chain(env)

    def _chain(self, env: Envelope) -> Verdict:
        dev, c, h = env.device_id, env.counter, env.hash
        link = ChainLink(c, h, env.prev)
        head = self._state.head(dev)

        def verdict(kind: VerdictKind, reason: str, missing: int = 0) -> Verdict:
            accepted = kind in ACCEPTED
            return Verdict(kind, reason, dev, c, h, missing, env.records if accepted else (), env if accepted else None)

        if head is None:
            # Counters below the first one seen are missing, not history: with shared subscriptions counter 2 can
            # commit before counter 1, which must then still be accepted as late.
            self._state.advance(dev, link, missing_from=1 if c > 1 else None)
            return verdict(VerdictKind.FIRST, f"first envelope seen from {dev!r} (counter {c})", c - 1)
        if c == head.counter + 1:
            if env.prev != head.hash:
                return verdict(VerdictKind.FORKED, f"counter {c} follows the head but its prev is not the head's hash")
            self._state.advance(dev, link, missing_from=None)
            return verdict(VerdictKind.NEXT, f"counter {c} extends the chain")
        if c > head.counter + 1:
            missing = c - head.counter - 1
            self._state.advance(dev, link, missing_from=head.counter + 1)
            return verdict(VerdictKind.GAP, f"counter {c} after {head.counter}: {missing} missing", missing)
        known = self._state.link_at(dev, c)
        if known is not None:
            if known.hash == h:
                return verdict(VerdictKind.DUPLICATE, f"counter {c} already accepted with the same hash")
            return verdict(VerdictKind.FORKED, f"counter {c} already accepted with different content")
        if self._state.is_missing(dev, c):
            before = self._state.link_at(dev, c - 1)
            if before is not None and before.hash != env.prev:
                return verdict(VerdictKind.FORKED, f"late counter {c}: prev does not match the envelope at {c - 1}")
            after = self._state.link_at(dev, c + 1)
            if after is not None and after.prev != h:
                return verdict(VerdictKind.FORKED, f"late counter {c}: the envelope at {c + 1} names another prev")
            self._state.fill(dev, link)
            return verdict(VerdictKind.LATE, f"counter {c} arrived late and fills a gap")
        return verdict(VerdictKind.STALE, f"counter {c} is below the head {head.counter} and not a known hole")
