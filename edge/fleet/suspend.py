"""Suspending a box that floods the fleet with bad messages: when, for how long. Sans-IO.

A box's bad messages cost the whole fleet: every one crosses the broker and is read, judged and quarantined by a
gateway. One box flooding its own topics at line rate halved the honest boxes' ingest in ``tools/bench/hostile.py``
even with every message quarantined correctly, because the cost is paid before anyone can tell it is bad. So the
gateway gives each box a budget of rejects, a token bucket: ``burst`` rejects at once, refilled at ``per_s``. A box
that overdraws it is *suspended*: its client is deleted from the broker's dynamic-security plugin, as a revoked
box's is (``edge.fleet.broker_sync``), which disconnects it; it may connect again, but whatever it publishes is
refused by the broker and never reaches a gateway. A suspension lasts ``base_s``, doubled for every suspension that
follows another within ``STRIKE_MEMORY_S`` of its end, at most ``base_s * MAX_FACTOR``; then its client returns.

What counts as a reject: a message quarantined on the box's account (a forgery, a malformed envelope or status, a
fork, a QoS 0 message shed from a full queue). Not a duplicate (an honest box's redelivery after a reconnect), not
a message whose handling failed on the gateway's side (``internal``). An honest box sends no rejects at all, so the
budget only ever bites a box that is broken or hostile; a broken one keeps its unsent data in its outbox while
suspended (the broker refuses its publishes, so they are never acknowledged and the outbox keeps them).

The suspension is recorded in the store (``Store.suspend``), so every gateway of the fleet applies it and the
operator sees it (``edge fleet status``) and can lift it (``edge fleet resume``). Each gateway keeps its own buckets:
with n gateways sharing the load, a box is suspended once the rejects one gateway saw overdraw that gateway's bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_FACTOR", "STRIKE_MEMORY_S", "RejectBudget", "Suspension", "suspension_length"]

MAX_FACTOR: Final = 64  # the longest suspension is base_s * 64 (one hour for the default minute)
STRIKE_MEMORY_S: Final = 86_400.0  # a suspension that follows another within a day of its end counts as a repeat


@dataclass(frozen=True, slots=True)
class Suspension:
    """A box's suspension as the store keeps it.

    Attributes:
        device_id: the box.
        since: when it began (gateway clock, epoch seconds).
        until: when it ends (lifted early by ``edge fleet resume``: then ``until`` is the lifting time).
        strikes: how many suspensions in a row (each within ``STRIKE_MEMORY_S`` of the last one's end).
        reason: why, for the operator.
        by: the gateway that decided it.
    """

    device_id: str
    since: float
    until: float
    strikes: int
    reason: str
    by: str

    def active(self, now: float) -> bool:
        """Whether it is in force at ``now``."""
        return self.since <= now < self.until


def suspension_length(strikes: int, base_s: float) -> float:
    """Seconds of the ``strikes``-th suspension in a row: ``base_s`` doubled per repeat, at most ``base_s * 64``."""
    return float(base_s * min(MAX_FACTOR, 1 << max(0, min(strikes - 1, 6))))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass
class RejectBudget:
    """Per-box token buckets of rejects.

    Args:
        burst: rejects a box may have at once (the bucket's size); 0 turns suspension off.
        per_s: rejects per second the bucket refills.
    """

    burst: int
    per_s: float
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether any box can ever be suspended."""
        return self.burst > 0

    def spend(self, device_id: str, n: int, now: float) -> bool:
        """Count ``n`` rejects of ``device_id`` at ``now``.

        Returns:
            True when this overdraws its budget: suspend it (its bucket is then full again, so the rejects still
            queued from before the suspension cannot trigger another one at once).
        """
        if not self.enabled or n <= 0:
            return False
        b = self._buckets.get(device_id)
        if b is None:
            b = self._buckets[device_id] = _Bucket(float(self.burst), now)
        b.tokens = self._level(b, now) - n
        b.at = now
        if b.tokens >= 0:
            if b.tokens >= self.burst:  # full: forget the box, so idle boxes cost no memory
                del self._buckets[device_id]
            return False
        b.tokens = float(self.burst)
        return True

    def _level(self, b: _Bucket, now: float) -> float:
        """The bucket's tokens at ``now``: refilled since it was last touched, never above ``burst``."""
        return min(float(self.burst), b.tokens + max(0.0, now - b.at) * self.per_s)

    def forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled by ``now`` (bounded memory over many boxes)."""
        full = [d for d, b in self._buckets.items() if self._level(b, now) >= self.burst]
        for d in full:
            del self._buckets[d]
