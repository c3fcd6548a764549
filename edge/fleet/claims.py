"""Who claimed which input first: the ledger's claim index, in memory, and its append-only log format. Sans-IO.

Every credited inference claims its input (``credit.claim_key``). Deciding whether an input was claimed before must
cost well under a microsecond: a B-tree index on disk takes a random page write per claim, which at a hundred claims
an envelope would cost more than verifying the envelope. So the index lives in memory and is persisted as a log:

- ``ClaimIndex``: key -> (device, envelope counter, UTC hour of receipt), for the claims of the ledger's window, as
  sorted numpy runs (24 bytes a claim). Each batch's claims become a run; runs merge in tiers (the last two when the
  older is at most twice the newer), so there are about log2(claims / batch) runs, and a merge drops claims older
  than the window and keeps the newest claim of a key.
- The log: one row per ingest batch that claimed anything (``encode_batch``), appended under the claims lock. A store
  reads the rows other processes appended since its last look (the tail) before it decides, under the same lock
  (SQLite's write lock; a PostgreSQL advisory lock), so two gateway processes never both credit one input. A
  restarted store rebuilds the index from the rows within the window.

The window is the ledger's: work older than ``max_age_s`` is not credited at all (``credit.CreditRules.plausible``),
so forgetting older claims cannot let an old input be credited twice.

Log row format, version 1 (little-endian): ``b"EDCL" 0x01``, u32 claims ``n``, u32 envelopes ``g``, u16 devices
``d``, then ``d`` device ids (u8 length, UTF-8), then per envelope u16 device index[g], int64 counter[g], u32
claims[g], then int64 keys[n] in envelope order (8 bytes a claim and 14 an envelope). ``decode_batch`` checks every
size before it reads. A claim's time is its row's ``created`` (the gateway's receipt): claims expire by receipt time.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from edge.fleet.errors import StoreError

__all__ = ["ClaimBatch", "ClaimIndex", "decode_batch", "encode_batch"]

_MAGIC: Final = b"EDCL\x01"
_HEAD: Final = struct.Struct("<5sIIH")  # magic, claims, envelopes, devices
_MAX_CLAIMS: Final = 1 << 24  # a batch holds at most batch_max x 1000 claims; this bounds a corrupt row
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ClaimBatch:
    """The claims one batch made, grouped by the envelope that made them.

    Attributes:
        devices: the claimant of each group.
        counters: the envelope counter of each group.
        keys: each group's claim keys.
    """

    devices: Sequence[str]
    counters: Sequence[int]
    keys: Sequence[I64]

    def __len__(self) -> int:
        """The number of claims."""
        return sum(len(k) for k in self.keys)


def encode_batch(batch: ClaimBatch) -> bytes:
    """One log row (see the module docstring)."""
    names = sorted(set(batch.devices))
    index = {name: i for i, name in enumerate(names)}
    sizes = [len(k) for k in batch.keys]
    parts = [_HEAD.pack(_MAGIC, sum(sizes), len(sizes), len(names))]
    for name in names:
        raw = name.encode("utf-8")
        parts.append(bytes([len(raw)]) + raw)
    parts.append(np.asarray([index[d] for d in batch.devices], dtype="<u2").tobytes())
    parts.append(np.asarray(batch.counters, dtype="<i8").tobytes())
    parts.append(np.asarray(sizes, dtype="<u4").tobytes())
    parts.extend(np.asarray(k, dtype="<i8").tobytes() for k in batch.keys)
    return b"".join(parts)


def decode_batch(data: bytes) -> ClaimBatch:
    """Read one log row.

    Raises:
        StoreError: the row is not a claim log row of this version, or its sizes do not add up (a corrupt store).
    """
    try:
        magic, n, ng, d = _HEAD.unpack_from(data, 0)
        if magic != _MAGIC or n > _MAX_CLAIMS or ng > n:
            raise ValueError(f"header {magic!r}, {n} claims in {ng} envelopes")
        pos = _HEAD.size
        names = []
        for _ in range(d):
            length = data[pos]
            names.append(data[pos + 1 : pos + 1 + length].decode("utf-8"))
            pos += 1 + length
        if len(data) - pos != ng * (2 + 8 + 4) + n * 8:
            raise ValueError(f"{len(data) - pos} bytes of arrays for {ng} envelopes and {n} claims")
        dev = np.frombuffer(data, "<u2", ng, pos).tolist()
        counters = np.frombuffer(data, "<i8", ng, pos + 2 * ng).tolist()
        sizes = np.frombuffer(data, "<u4", ng, pos + 10 * ng)
        keys = np.frombuffer(data, "<i8", n, pos + 14 * ng).astype(np.int64)
        if ng and (max(dev) >= len(names) or int(sizes.sum()) != n):
            raise ValueError("envelopes do not add up to the claims, or name a device beyond the list")
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise StoreError(f"a claim log row is corrupt: {e}") from e
    return ClaimBatch([names[i] for i in dev], counters, np.split(keys, np.cumsum(sizes)[:-1].tolist()))


@dataclass(slots=True)
class _Run:
    keys: I64  # sorted, unique
    devices: npt.NDArray[np.int32]
    counters: I64
    hours: npt.NDArray[np.int32]


class ClaimIndex:
    """The first claim of every input within the window (see the module docstring). Not thread-safe."""

    def __init__(self) -> None:
        """Create an empty index."""
        self._runs: list[_Run] = []
        self._names: list[str] = []
        self._numbers: dict[str, int] = {}

    def __len__(self) -> int:
        """Claims held (within the window, give or take a merge)."""
        return sum(len(r.keys) for r in self._runs)

    def lookup(self, keys: I64, min_hour: int) -> dict[int, tuple[str, int]]:
        """The claimant (device, counter) of each of ``keys`` claimed at or after ``min_hour``.

        Args:
            keys: claim keys, unique.
            min_hour: the oldest UTC hour of the window (claims before it are forgotten, whether or not a merge has
                dropped them yet: the answer does not depend on when the index last merged).

        Returns:
            The claimed keys; the others are new. Usually empty.
        """
        found: dict[int, tuple[str, int]] = {}
        if not len(keys):
            return found
        for run in reversed(self._runs):  # newest first: a key claimed again after expiring is the newer claim
            pos = np.searchsorted(run.keys, keys)
            pos[pos == len(run.keys)] = 0
            hits = np.flatnonzero((run.keys[pos] == keys) & (run.hours[pos] >= min_hour))
            for i in hits.tolist():
                k = int(keys[i])
                if k not in found:
                    j = int(pos[i])
                    found[k] = (self._names[int(run.devices[j])], int(run.counters[j]))
        return found

    def add(self, batch: ClaimBatch, hour: int, min_hour: int) -> None:
        """Record claims (their keys unclaimed within the window: the caller looked them up under the same lock).

        Args:
            batch: the claims.
            hour: the UTC hour they were received (their row's ``created``).
            min_hour: the window's oldest hour now; merges drop claims before it.
        """
        if not len(batch):
            return
        sizes = [len(k) for k in batch.keys]
        keys = np.concatenate(batch.keys).astype(np.int64, copy=False)
        devices = np.repeat(np.asarray([self._number(d) for d in batch.devices], dtype=np.int32), sizes)
        counters = np.repeat(np.asarray(batch.counters, dtype=np.int64), sizes)
        order = np.argsort(keys, kind="stable")
        run = _Run(keys[order], devices[order], counters[order], np.full(len(keys), hour, dtype=np.int32))
        self._runs.append(_dedup(run))
        runs = self._runs
        while len(runs) >= 2 and len(runs[-2].keys) <= 2 * len(runs[-1].keys):
            runs[-2:] = [_merge(runs[-2], runs[-1], min_hour)]

    def _number(self, device_id: str) -> int:
        n = self._numbers.get(device_id)
        if n is None:
            n = self._numbers[device_id] = len(self._names)
            self._names.append(device_id)
        return n


def _dedup(run: _Run) -> _Run:
    """Keep one claim per key (the last, by position: merges put the newer run last)."""
    if len(run.keys) < 2:
        return run
    last = np.append(run.keys[1:] != run.keys[:-1], True)
    if last.all():
        return run
    return _Run(run.keys[last], run.devices[last], run.counters[last], run.hours[last])


def _merge(older: _Run, newer: _Run, min_hour: int) -> _Run:
    keys = np.concatenate([older.keys, newer.keys])
    devices = np.concatenate([older.devices, newer.devices])
    counters = np.concatenate([older.counters, newer.counters])
    hours = np.concatenate([older.hours, newer.hours])
    keep = hours >= min_hour
    order = np.argsort(keys[keep], kind="stable")  # stable: a key in both runs keeps the newer one last
    return _dedup(_Run(keys[keep][order], devices[keep][order], counters[keep][order], hours[keep][order]))
