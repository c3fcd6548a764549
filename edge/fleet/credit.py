"""Crediting verified work: which inference records of accepted envelopes earn credit, and why the others do not.

A box is paid by the ledger, so the ledger counts work, not messages. Every inference record of an accepted envelope
is *claimed*; it is *credited* unless one of these rules says otherwise, checked in this order:

1. ``implausible_time``: its timestamp (the box's clock) lies outside
   ``[max(enrolled_at, received_at - max_age_s) - max_ahead_s, received_at + max_ahead_s]``: work cannot predate the
   box's enrollment, nor be older than the backlog a box may upload, nor come from the future. A box must keep its
   clock set (NTP); an unset clock earns nothing, visibly.
2. ``copied``: another device claimed the same (model id, input hash) first (in the gateway's processing order).
   Only the first verified claimant of an input is credited; the later one is flagged, not credited.
3. ``duplicate_input``: this device claimed the same (model id, input hash) before, in an earlier record of the same
   envelope or in any earlier envelope. Re-sent records, replays of an input, and identical frames count once.
4. ``over_ceiling``: the device already has ``ceiling x 3600`` credited inferences of this model whose timestamps
   fall in the same UTC hour. The ceiling (inferences per second a box can do with this model) is configured per
   model; the hours are the box's own timeline, so a backlog uploaded after an outage is credited in the hours it
   was done, while claims beyond what the model can do in an hour are flagged. Rule 1 bounds how far a box can
   spread fabricated timestamps: never before its enrollment.

Identical frames: the gateway cannot tell a static scene from a replayed frame, so an input earns once per model,
fleet-wide, whatever produced it. A real camera's sensor noise makes consecutive frames of a static scene differ in
their bytes; a source that repeats exact bytes (a frozen camera, a looped file, the synthetic source's cycle of
renders) repeats work that was already paid.

An input hash is the box's claim, not proof: a hostile box can invent hashes. The ceiling bounds what such a box can
be credited; dedup and the copy rule stop it from being paid for replays and for other boxes' work.

An input is identified by its ``claim_key``: the first 64 bits of its input hash, XORed with the first 64 bits of
SHA-256 of the model id (so one frame run through two models makes two claims). Two claims with one key are one
input. A box's input hashes are SHA-256 values of its frames, uniformly spread, so honest claims collide by chance
once in about 1.8e19 pairs. A hostile box chooses its "hashes" and can make its own claims collide, which only
turns its own second claim into a duplicate; to make another box's claim look copied it would have to claim that
box's input first, which no hash function prevents and the ledger flags all the same.

``BatchCredits`` is the planner for one store transaction: the store feeds it the accepted envelopes in processing
order, looks up who claimed its ``keys()`` before (``edge.fleet.claims``) and the per-hour counts of its
``buckets()``, gets the outcome of every record from ``resolve``, and records ``new_claims`` in its claim log.
Everything here is pure.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from edge.fleet.claims import I64, ClaimBatch
from edge.wire.records import InferenceRecord

__all__ = [
    "HOUR_S",
    "UNCREDITED",
    "BatchCredits",
    "CreditRules",
    "Outcome",
    "Owner",
    "Resolution",
    "claim_key",
    "model_salt",
]

HOUR_S: Final = 3600
_SIGN: Final = 1 << 63
_Bucket = tuple[str, str, int]  # (device, model id, UTC hour of the box's timeline)


class Outcome(enum.StrEnum):
    """What the ledger made of one claimed inference."""

    CREDITED = "credited"
    DUPLICATE_INPUT = "duplicate_input"
    COPIED = "copied"
    OVER_CEILING = "over_ceiling"
    IMPLAUSIBLE_TIME = "implausible_time"


UNCREDITED: Final = tuple(o for o in Outcome if o is not Outcome.CREDITED)


@dataclass(frozen=True, slots=True)
class CreditRules:
    """The ledger's crediting parameters.

    Attributes:
        ceiling_per_s: inferences per second a box can do with a model that ``ceilings`` does not name.
        ceilings: per-model ceilings, keyed by model id (``name@version``) or by name (every version).
        max_age_s: the oldest work, relative to its receipt, a box may still be credited for (its backlog).
        max_ahead_s: how far a box's clock may run ahead of the gateway's (and work predate enrollment).
    """

    ceiling_per_s: float = 1000.0
    ceilings: Mapping[str, float] = field(default_factory=dict)
    max_age_s: float = 30 * 86400.0
    max_ahead_s: float = 600.0

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            ValueError: a ceiling or window is not a finite positive number.
        """
        for name, value in (("ceiling_per_s", self.ceiling_per_s), *self.ceilings.items()):
            if not math.isfinite(value) or not 0 < value <= 1e9:
                raise ValueError(f"ceiling {name!r} = {value!r}: expected inferences per second in (0, 1e9]")
        for name, value in (("max_age_s", self.max_age_s), ("max_ahead_s", self.max_ahead_s)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} = {value!r}: expected seconds >= 0")

    def hourly_cap(self, model_id: str) -> int:
        """The most credited inferences of ``model_id`` per device and UTC hour of the box's timeline."""
        per_s = self.ceilings.get(model_id)
        if per_s is None:
            per_s = self.ceilings.get(model_id.partition("@")[0], self.ceiling_per_s)
        return max(1, int(per_s * HOUR_S))

    def plausible(self, ts: float, received_at: float, enrolled_at: float) -> bool:
        """Whether a record stamped ``ts`` can be work done for the fleet, received at ``received_at``."""
        lo = max(enrolled_at, received_at - self.max_age_s) - self.max_ahead_s
        return lo <= ts <= received_at + self.max_ahead_s


def claim_key(model_id: str, input_sha256: str) -> int:
    """The 64-bit signed key of a claim (the claim table's primary key; see the module docstring).

    Args:
        model_id: the model id.
        input_sha256: the input hash as 64 lower-case hex digits (as ``InferenceRecord`` carries it).

    Returns:
        An integer in the signed 64-bit range.
    """
    return _key(model_salt(model_id), input_sha256)


def model_salt(model_id: str) -> int:
    """The first 64 bits of SHA-256 of the model id, as an unsigned integer."""
    return int.from_bytes(hashlib.sha256(model_id.encode("utf-8")).digest()[:8], "big")


def _key(salt: int, input_hex: str) -> int:
    return (int(input_hex[:16], 16) ^ salt ^ _SIGN) - _SIGN


@dataclass(frozen=True, slots=True)
class Owner:
    """A claim made before the batch: the first claimant and the envelope that claimed it."""

    device_id: str
    counter: int


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of a batch's inference records.

    Attributes:
        exceptions: per (device, counter) of an envelope with any uncredited inference, the canonical JSON the
            envelope row keeps: ``{"<outcome>": [idx, ...], "copied": [[idx, first claimant], ...]}``.
        tally: credited and uncredited counts per (device, day, model, outcome).
        hours: per-hour increments (device, model, hour, credited, cap), sorted.
    """

    exceptions: dict[tuple[str, int], str]
    tally: Counter[tuple[str, str, str, str]]
    hours: list[tuple[str, str, int, int, int]]


@dataclass(slots=True)
class _Env:
    """One accepted envelope's inference records, as arrays (a batch holds ~20,000 records: no object or tuple per
    record for the interpreter to make and the garbage collector to walk)."""

    device_id: str
    counter: int
    day: str
    idxs: list[int]  # each inference's index in the envelope
    model: str  # the one model, unless ``models`` lists one per record
    models: list[str] | None
    keys: I64
    hours: I64  # UTC hour of each record's timestamp
    ok: npt.NDArray[np.bool_]  # plausible time
    first: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))  # batch's first claim
    clean: bool = False  # one model, all plausible, all first: credited in bulk when the ceiling allows
    per_bucket: dict[tuple[str, int], int] = field(default_factory=dict)  # (model, hour) -> plausible records
    per_model: dict[str, int] = field(default_factory=dict)


class BatchCredits:
    """Plans the credit of one batch's accepted envelopes (see the module docstring)."""

    def __init__(self, rules: CreditRules) -> None:
        """Create an empty plan.

        Args:
            rules: the crediting parameters.
        """
        self.rules = rules
        self._envs: list[_Env] = []
        self._salts: dict[str, np.uint64] = {}
        self._keys: I64 | None = None  # the batch's unique plausible keys, once analysed
        self._first_env: dict[int, int] | None = None  # key -> envelope of its first claim (only when needed)
        self._first_env_arrays: tuple[I64, npt.NDArray[np.intp]] | None = None

    def add(  # noqa: PLR0917 -- one envelope's facts, in the order the store has them
        self,
        device_id: str,
        counter: int,
        day: str,
        received_at: float,
        enrolled_at: float,
        records: Sequence[object],
    ) -> None:
        """Add an accepted envelope's records (in processing order).

        Args:
            device_id: the device.
            counter: the envelope's counter.
            day: the UTC day it was received.
            received_at: when it was received (gateway clock).
            enrolled_at: when the device was enrolled.
            records: its records; only ``InferenceRecord`` ones are claims.
        """
        infs = [r for r in records if type(r) is InferenceRecord]
        if not infs:
            return
        rules = self.rules
        lo = max(enrolled_at, received_at - rules.max_age_s) - rules.max_ahead_s
        hi = received_at + rules.max_ahead_s
        idxs = list(range(len(infs))) if len(infs) == len(records) else [
            i for i, r in enumerate(records) if type(r) is InferenceRecord
        ]  # fmt: skip
        stamps = np.fromiter((r.timestamp for r in infs), np.float64, len(infs))
        # The first 64 bits of every input hash in one C call, XORed with the model's salt (claim_key): as uint64,
        # viewed as int64, which is claim_key's signed value.
        prefixes = np.frombuffer(bytes.fromhex("".join([r.input_sha256[:16] for r in infs])), ">u8")
        model_list = [r.model_id for r in infs]
        models = set(model_list)
        if len(models) == 1:
            (model,) = models
            salts: np.uint64 | npt.NDArray[np.uint64] = self._salt(model)
            per_record = None
        else:
            model = model_list[0]
            salts = np.fromiter((self._salt(m) for m in model_list), np.uint64, len(model_list))
            per_record = model_list
        self._envs.append(
            _Env(
                device_id,
                counter,
                day,
                idxs,
                model,
                per_record,
                (prefixes ^ salts).view(np.int64),
                (stamps // HOUR_S).astype(np.int64),
                (stamps >= lo) & (stamps <= hi),
            )
        )
        self._keys = None

    def _salt(self, model_id: str) -> np.uint64:
        salt = self._salts.get(model_id)
        if salt is None:
            salt = self._salts[model_id] = np.uint64(model_salt(model_id))
        return salt

    def _analyse(self) -> I64:
        """Mark each envelope's first claims of the batch and whether it is clean; returns the unique keys."""
        if self._keys is not None:
            return self._keys
        envs = self._envs
        if not envs:
            self._keys = np.zeros(0, dtype=np.int64)
            return self._keys
        keys = np.concatenate([e.keys for e in envs])
        ok = np.concatenate([e.ok for e in envs])
        owner = np.repeat(np.arange(len(envs)), [len(e.keys) for e in envs])
        plausible = np.flatnonzero(ok)
        unique, first_at = np.unique(keys[plausible], return_index=True)
        first = np.zeros(len(keys), dtype=bool)
        first[plausible[first_at]] = True
        self._first_env_arrays = (unique, owner[plausible[first_at]])
        start = 0
        for e in envs:
            n = len(e.keys)
            e.first = first[start : start + n]
            start += n
            e.clean = e.models is None and bool(e.ok.all()) and bool(e.first.all())
            if e.models is None:
                hours, counts = np.unique(e.hours[e.ok], return_counts=True)
                e.per_bucket = {(e.model, h): c for h, c in zip(hours.tolist(), counts.tolist(), strict=True)}
            else:
                e.per_bucket = {}
                for model, hour, good in zip(e.models, e.hours.tolist(), e.ok.tolist(), strict=True):
                    if good:
                        e.per_bucket[model, hour] = e.per_bucket.get((model, hour), 0) + 1
            e.per_model = {}
            for (model, _hour), c in e.per_bucket.items():
                e.per_model[model] = e.per_model.get(model, 0) + c
        self._keys = unique
        return unique

    def _first_envs(self) -> dict[int, int]:
        """key -> ordinal of the envelope holding its first claim in the batch (built when the slow path needs it)."""
        if self._first_env is None:
            self._analyse()
            assert self._first_env_arrays is not None
            unique, envs = self._first_env_arrays
            self._first_env = dict(zip(unique.tolist(), envs.tolist(), strict=True))
        return self._first_env

    def keys(self) -> I64:
        """The claim keys of the batch's plausible records, unique and sorted."""
        return self._analyse()

    def claims_own(self, key: int, device_id: str, counter: int) -> bool:
        """Whether a stored claim of ``key`` by (``device_id``, ``counter``) is this batch's own first claim of it."""
        at = self._first_envs().get(key)
        return at is not None and (self._envs[at].device_id, self._envs[at].counter) == (device_id, counter)

    def new_claims(self, owners: Mapping[int, Owner] | None) -> ClaimBatch:
        """The claims this batch makes, by envelope: each key's first plausible record in the batch, unless
        ``owners`` (what ``resolve`` was given) says the key was claimed before."""
        self._analyse()
        owned = np.fromiter(owners, np.int64, len(owners)) if owners else None
        devices, counters, keys = [], [], []
        for e in self._envs:
            mask = e.first if owned is None else e.first & ~np.isin(e.keys, owned)
            claimed = e.keys if e.clean and owned is None else e.keys[mask]
            if len(claimed):
                devices.append(e.device_id)
                counters.append(e.counter)
                keys.append(claimed)
        return ClaimBatch(devices, counters, keys)

    def buckets(self) -> list[_Bucket]:
        """The (device, model, hour) buckets the batch's plausible records fall in, sorted."""
        self._analyse()
        return sorted({(e.device_id, m, h) for e in self._envs for m, h in e.per_bucket})

    def resolve(
        self,
        owners: Mapping[int, Owner] | None,
        hours: Mapping[_Bucket, tuple[int, int]],
    ) -> Resolution:
        """Decide every record's outcome.

        Args:
            owners: the keys of ``keys()`` claimed before this batch, with their claimant; None or empty: none.
            hours: credited count and cap already stored per bucket (absent: none yet).

        Returns:
            The resolution.
        """
        self._analyse()
        claimed_before = bool(owners)
        budget: dict[_Bucket, list[int]] = {}  # bucket -> [credited now, cap, stored]
        tally: Counter[tuple[str, str, str, str]] = Counter()
        exceptions: dict[tuple[str, int], str] = {}
        for e in self._envs:
            # A clean envelope's keys are the batch's first claims, so only claims from before can touch it.
            if e.clean and not claimed_before and self._take_all(e, hours, budget):
                for model, n in e.per_model.items():
                    tally[e.device_id, e.day, model, Outcome.CREDITED.value] += n
                continue
            self._resolve_slowly(e, owners or {}, hours, budget, tally, exceptions)
        return Resolution(
            exceptions,
            tally,
            [(dev, model, hour, n, cap) for (dev, model, hour), (n, cap, _stored) in sorted(budget.items()) if n],
        )

    def _resolve_slowly(  # noqa: PLR0917 -- the resolution's running state
        self,
        e: _Env,
        owners: Mapping[int, Owner],
        hours: Mapping[_Bucket, tuple[int, int]],
        budget: dict[_Bucket, list[int]],
        tally: Counter[tuple[str, str, str, str]],
        exceptions: dict[tuple[str, int], str],
    ) -> None:
        """Record by record: the envelopes with an implausible time, an input seen before, or a full hour."""
        first_envs = self._first_envs()
        models = e.models or [e.model] * len(e.idxs)
        counts: Counter[tuple[str, Outcome]] = Counter()
        lists: dict[str, list[object]] = {}
        for idx, model, key, hour, good, first in zip(
            e.idxs, models, e.keys.tolist(), e.hours.tolist(), e.ok.tolist(), e.first.tolist(), strict=True
        ):
            if not good:
                outcome = Outcome.IMPLAUSIBLE_TIME
                lists.setdefault(outcome, []).append(idx)
            elif (before := owners.get(key)) is not None or not first:
                by = before.device_id if before is not None else self._envs[first_envs[key]].device_id
                if by == e.device_id:
                    outcome = Outcome.DUPLICATE_INPUT
                    lists.setdefault(outcome, []).append(idx)
                else:
                    outcome = Outcome.COPIED
                    lists.setdefault(outcome, []).append([idx, by])
            else:
                state = self._budget((e.device_id, model, hour), hours, budget)
                if state[0] + state[2] < state[1]:
                    state[0] += 1
                    outcome = Outcome.CREDITED
                else:
                    outcome = Outcome.OVER_CEILING
                    lists.setdefault(outcome, []).append(idx)
            counts[model, outcome] += 1
        for (model, done), n in counts.items():
            tally[e.device_id, e.day, model, done.value] += n
        if lists:
            exceptions[e.device_id, e.counter] = json.dumps(dict(sorted(lists.items())), separators=(",", ":"))

    def _budget(
        self, b: _Bucket, hours: Mapping[_Bucket, tuple[int, int]], budget: dict[_Bucket, list[int]]
    ) -> list[int]:
        state = budget.get(b)
        if state is None:
            already, cap = hours.get(b, (0, self.rules.hourly_cap(b[1])))
            state = budget[b] = [0, cap, already]
        return state

    def _take_all(self, e: _Env, hours: Mapping[_Bucket, tuple[int, int]], budget: dict[_Bucket, list[int]]) -> bool:
        """Credit all of ``e``'s claims if every hour they fall in has room for them; else change nothing."""
        states = [(self._budget((e.device_id, m, h), hours, budget), n) for (m, h), n in e.per_bucket.items()]
        if any(st[0] + st[2] + n > st[1] for st, n in states):
            return False
        for st, n in states:
            st[0] += n
        return True


def count_outcomes(outcomes: Iterable[str]) -> dict[str, int]:
    """Count outcome names, every ``Outcome`` present (zero when absent)."""
    c = Counter(outcomes)
    return {o.value: c.get(o.value, 0) for o in Outcome}
