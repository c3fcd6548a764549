"""Proven time: the rule every time floor of the box obeys, and the OTA time floor that persists it.

Boxes may lack a battery-backed real-time clock. After a power cut such a box can wake up in 1970, or simply with a
wrong time, and TUF's freeze protection (metadata expires) then fails open: a timestamp that expired months ago looks
valid to a box that believes it is 1970. A **floor** closes that hole: the newest time the box has proven, which only
rises (except by the fleet's ``time/reset``) and only from times that arrive signed by someone the box trusts:

- ``x-edge-issued`` of every timestamp metadata the TUF client verified (``edge.ota.trust``; the timestamp key),
- the issued-at time of every verified command from the gateway (the fleet command key),
- and, without a signature, ``BUILD_TIME``: the release time of the running code (a box is never older than the
  code it runs; the constant is as trustworthy as the code that checks every signature, unlike a file time).

The box's notion of "now" for every expiry check is ``max(clock, floor, BUILD_TIME)``.

The rule (docs/ota.md, "Clocks"), stated once here and used by both floors (this one and the command nonce set's,
``edge.wire.commands``):

1. A signed time is not a time in the future: both online keys (timestamp, command) can be stolen, and a fleet's
   clock can be wrong. One signed time ``t`` raises a floor at most to the **horizon**
   ``max(clock, BUILD_TIME) + MAX_AHEAD_S``, measured from the box's own clock and never from the floor itself, so
   a sequence of messages each slightly ahead cannot ratchet the floor forward.
2. Beyond the horizon a time is only a **claim**. The latest claim of each kind is kept in memory. A box whose clock
   is clearly unset (earlier than ``BUILD_TIME``: an RTC-less box before NTP) raises the floor beyond the horizon
   only when claims of the two kinds, signed by different keys, agree within ``MAX_AHEAD_S`` (compared as offsets
   from the box's clock, so uptime between them does not count); the floor then rises to the smaller of the two.
   One stolen key alone therefore never moves a floor beyond the horizon; a box with a set clock needs no such
   confirmation and takes none.
3. ``time/reset`` (a fleet command, docs/commands.md) lowers a floor to the fleet's true time, never below the box's
   own ``max(clock, BUILD_TIME)``, and forgets the claims.

The floor is persisted atomically (``{"floor": <epoch seconds>, "source": "<who proved it>", "rule": 1}``; older
firmware reads the same file and ignores ``rule``). A file without ``rule`` was written before the rule above. It is
loaded as it is, even far in the future: the box cannot tell a floor some wrong clock wrote from one it proved, so it
keeps it for TUF (lowering it could let a replayed timestamp freeze the box), reports it in its status, warns, and
the fleet runs ``time/reset`` (docs/ota.md). Until the floor is next written under the rule it does not bound the
command floor (``lower_bound`` is 0), so a far-future command cannot carry an old wrong floor over to commands.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from edge._fs import atomic_write
from edge.errors import ConfigError
from edge.wire.commands import base_time

__all__ = [
    "BUILD_TIME",
    "MAX_AHEAD_S",
    "Claim",
    "Judgement",
    "SourceKind",
    "TimeFloor",
    "base_time",
    "clock_unset",
    "horizon",
    "judge",
]

log = logging.getLogger(__name__)

# How far ahead of the box's own clock one signed time may move a floor. An hour covers any honest skew between a
# fleet and a box with a working clock, and it costs little: TUF metadata lives a day or more, so a floor an hour
# ahead never makes fresh metadata look expired.
MAX_AHEAD_S: Final = 3600.0

# The release time of this code (2026-11-01T00:00:00Z), bumped at each release. A stale value only weakens the
# floor; a value in the future would make the box believe it is later than it is (tests/ota/test_clock.py checks
# that it is not).
BUILD_TIME: Final = 1_793_491_200.0

SourceKind = Literal["tuf", "command"]
_OTHER: Final[dict[SourceKind, SourceKind]] = {"tuf": "command", "command": "tuf"}

_MAX_FILE: Final = 4096
_RULE: Final = 1  # the version of the rule a floor file was written under (absent: before it)


def horizon(clock: float, build_time: float) -> float:
    """How far one signed time may raise a floor: ``max(clock, build_time) + MAX_AHEAD_S``."""
    return base_time(clock, build_time) + MAX_AHEAD_S


def clock_unset(clock: float, build_time: float) -> bool:
    """Whether the box's clock is clearly unset: earlier than the code it runs (or not a number)."""
    return not (math.isfinite(clock) and clock >= build_time)


@dataclass(frozen=True, slots=True)
class Claim:
    """A signed time beyond the horizon, kept until a source of the other kind agrees with it.

    Attributes:
        t: the signed time.
        clock: the box's clock when it arrived.
        source: who signed it (for the log and the floor's source).
    """

    t: float
    clock: float
    source: str


@dataclass(frozen=True, slots=True)
class Judgement:
    """What one signed time does to a floor (``judge``'s result).

    Attributes:
        floor: the floor afterwards (never lower than before).
        source: who proved ``floor``.
        claims: the claims afterwards, by kind.
        bounded: True when ``t`` was beyond the horizon and not confirmed (it raised the floor to the horizon at
            most).
    """

    floor: float
    source: str
    claims: Mapping[SourceKind, Claim]
    bounded: bool


def _agree(a: Claim, b: Claim) -> bool:
    if not (math.isfinite(a.clock) and math.isfinite(b.clock)):
        return False
    # Offsets from the box's clock: a TUF claim an hour of uptime before a command claim still agrees with it.
    return abs((a.t - a.clock) - (b.t - b.clock)) <= MAX_AHEAD_S


def judge(
    t: float,
    kind: SourceKind,
    by: str,
    *,
    floor: float,
    source: str,
    clock: float,
    build_time: float,
    claims: Mapping[SourceKind, Claim],
) -> Judgement:
    """Apply the rule of the module docstring to one signed time. Sans-IO.

    Args:
        t: the signed time (epoch seconds), which arrived with a valid signature.
        kind: which key signed it (``"tuf"``: the timestamp key; ``"command"``: the fleet command key).
        by: a label for it, e.g. ``"tuf timestamp v42"``.
        floor: the floor now.
        source: who proved it.
        clock: the box's clock when it arrived.
        build_time: the running code's release time.
        claims: the claims beyond the horizon seen so far, by kind.

    Returns:
        The new floor, its source and the claims; ``floor`` is unchanged when ``t`` is not finite or not newer.
    """
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        return Judgement(floor, source, claims, False)
    t = float(t)
    limit = horizon(clock, build_time)
    new_claims = dict(claims)
    bounded = False
    if t <= limit:
        candidate, label = t, by
    else:
        mine = Claim(t, clock, by)
        new_claims[kind] = mine
        other = claims.get(_OTHER[kind])
        if other is not None and clock_unset(clock, build_time) and _agree(mine, other):
            candidate, label = min(t, other.t), f"{by} + {other.source}"
        else:
            candidate, label, bounded = limit, f"{by} (bounded at the horizon)", True
    if candidate <= floor:
        return Judgement(floor, source, new_claims, bounded)
    return Judgement(candidate, label, new_claims, bounded)


class TimeFloor:
    """The OTA time floor of this box, persisted in ``path``; thread-safe.

    Args:
        path: the JSON file holding the floor; a missing file means nothing has been proven yet (floor 0).
        build_time: the running code's release time (``BUILD_TIME``; tests give their own).

    Raises:
        ConfigError: the file exists but is not a valid floor (it is our own atomically written state, so this
            means local disk corruption, not input from outside).
    """

    def __init__(self, path: Path, *, build_time: float = BUILD_TIME) -> None:
        self._path = Path(path)
        self._build_time = float(build_time)
        self._lock = threading.Lock()
        self._floor = 0.0
        self._source = "none"
        self._under_rule = True  # nothing loaded: 0.0 is no claim at all
        self._claims: Mapping[SourceKind, Claim] = {}
        self._load()

    def _load(self) -> None:
        try:
            with self._path.open("rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(str(self._path), type(e).__name__, f"a readable time floor file ({e})") from e
        try:
            doc = json.loads(raw) if len(raw) <= _MAX_FILE else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        floor = doc.get("floor") if isinstance(doc, dict) else None
        source = doc.get("source") if isinstance(doc, dict) else None
        if (
            isinstance(floor, bool)
            or not isinstance(floor, int | float)
            or not math.isfinite(floor)
            or not isinstance(source, str)
        ):
            raise ConfigError(
                str(self._path),
                raw[:80],
                'a JSON object {"floor": <finite number>, "source": <str>} (remove the file to start from the '
                "firmware's build time)",
            )
        # Loaded as it is, even far in the future (a file written before the horizon rule): see the module docstring.
        self._floor = float(floor)
        self._source = source
        self._under_rule = isinstance(doc, dict) and doc.get("rule") == _RULE

    @property
    def path(self) -> Path:
        """The file the floor is persisted in."""
        return self._path

    @property
    def build_time(self) -> float:
        """The running code's release time this floor starts from."""
        return self._build_time

    @property
    def source(self) -> str:
        """Who proved the current floor (``"none"`` before anything was proven)."""
        with self._lock:
            return self._source

    def floor(self) -> float:
        """The newest proven time, in seconds since the epoch (0.0 before anything was proven)."""
        with self._lock:
            return self._floor

    def lower_bound(self) -> float:
        """A time the box has surely reached unless two keys lied: the floor less ``MAX_AHEAD_S``.

        One signed time raises the floor at most ``MAX_AHEAD_S`` past the box's own clock, and two agreeing ones to
        the smaller of them, so this never exceeds a time the box's clock showed or an honest source signed. The
        command nonce set may raise its floor up to it (``edge.wire.commands``). 0.0 while the floor is one a
        file from before the rule holds: nothing vouches for that one.
        """
        with self._lock:
            return self._floor - MAX_AHEAD_S if self._under_rule else 0.0

    def ahead(self, clock: float) -> bool:
        """Whether the floor is beyond the horizon of ``clock`` (a file from before the rule, or two sources that
        agreed on a wrong time): the fleet should run ``time/reset``."""
        return self.floor() > horizon(clock, self._build_time)

    def prove(self, t: float, source: str, *, kind: SourceKind, clock: float) -> bool:
        """Offer a signed time; the floor rises as the module docstring's rule allows, and never lowers.

        Args:
            t: a time in seconds since the epoch that arrived signed by a trusted party.
            source: who vouched for it, e.g. ``"tuf timestamp v42"`` (kept for the log and the status).
            kind: which key signed it: ``"tuf"`` (the timestamp key) or ``"command"`` (the fleet command key).
            clock: the box's clock now (epoch seconds).

        Returns:
            True when the floor rose (and was persisted), False otherwise.

        Raises:
            OSError: the floor could not be persisted (it did not rise).
        """
        with self._lock:
            j = judge(
                t,
                kind,
                source,
                floor=self._floor,
                source=self._source,
                clock=clock,
                build_time=self._build_time,
                claims=self._claims,
            )
            if j.bounded:
                # Expected on a box whose clock is unset (until a source of the other kind agrees); suspicious on one
                # whose clock is set: a fleet clock that is wrong, or a stolen key.
                unset = clock_unset(clock, self._build_time)
                log.log(
                    logging.INFO if unset else logging.WARNING,
                    "signed time %.0f from %s is more than %.0f s past the box's %s (%.0f): not believed beyond "
                    "that horizon (docs/ota.md, Clocks)",
                    t,
                    source,
                    MAX_AHEAD_S,
                    "build time (its clock is unset)" if unset else "clock",
                    base_time(clock, self._build_time),
                )
            self._claims = j.claims
            if j.floor <= self._floor:
                return False
            self._persist(j.floor, j.source)
            return True

    def reset(self, to: float, *, clock: float) -> bool:
        """Lower the floor to the fleet's true time (the ``time/reset`` command); never below
        ``max(clock, build time)``, never raises it; forgets the claims.

        Args:
            to: the fleet's time, from a verified ``time/reset``.
            clock: the box's clock now.

        Returns:
            True when the floor went down (and was persisted).

        Raises:
            OSError: the floor could not be persisted (it did not change).
        """
        if isinstance(to, bool) or not isinstance(to, int | float) or not math.isfinite(to):
            raise ValueError(f"time/reset: 'to' must be a finite number of epoch seconds, got {to!r}")
        target = max(float(to), base_time(clock, self._build_time))
        with self._lock:
            self._claims = {}
            if target >= self._floor:
                return False
            self._persist(target, "time/reset")
            return True

    def _persist(self, floor: float, source: str) -> None:
        body = json.dumps({"floor": floor, "rule": _RULE, "source": source}, sort_keys=True).encode()
        # Persist before changing the in-memory value, so memory never claims more than the disk holds.
        atomic_write(self._path, body)
        self._floor = floor
        self._source = source
        self._under_rule = True

    def now(self, clock_value: float) -> float:
        """The effective time for expiry checks: ``max(clock_value, floor, build time)``."""
        return max(base_time(clock_value, self._build_time), self.floor())
