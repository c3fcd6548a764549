"""The time floor: the newest time this box has proven, so a reset clock cannot make old metadata look fresh.

Boxes may lack a battery-backed real-time clock. After a power cut such a box can wake up in 1970, or simply with a
wrong time, and TUF's freeze protection (metadata expires) then fails open: a timestamp that expired months ago looks
valid to a box that believes it is 1970. The floor closes that hole. It only ever rises, and only from times that
arrive signed by someone the box trusts:

- ``x-edge-issued`` of every timestamp metadata the TUF client verified (``edge.ota.trust`` feeds it),
- the issued-at time of every verified command from the gateway,
- the build time of the running firmware (a box is never older than the image it runs).

The box's notion of "now" for every expiry check is ``max(clock, floor)``: a clock that runs behind is corrected
upwards, a clock that runs ahead is believed (the floor cannot know the future, and trusting a fast clock only makes
metadata expire early, which fails safe). The floor cannot tell a plausible signed time from an absurd one: callers
must only pass times that came with a valid signature.

The floor is persisted atomically (``{"floor": <epoch seconds>, "source": "<who proved it>"}``) so it survives
restarts and power cuts.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Final

from edge._fs import atomic_write
from edge.errors import ConfigError

__all__ = ["TimeFloor"]

_MAX_FILE: Final = 4096


class TimeFloor:
    """The newest proven time of this box, persisted in ``path``.

    Args:
        path: the JSON file holding the floor; a missing file means nothing has been proven yet (floor 0).

    Raises:
        ConfigError: the file exists but is not a valid floor (it is our own atomically written state, so this
            means local disk corruption, not input from outside).
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._floor = 0.0
        self._source = "none"
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
            raise ConfigError(str(self._path), raw[:80], 'a JSON object {"floor": <finite number>, "source": <str>}')
        self._floor = float(floor)
        self._source = source

    @property
    def path(self) -> Path:
        """The file the floor is persisted in."""
        return self._path

    @property
    def source(self) -> str:
        """Who proved the current floor (``"none"`` before anything was proven)."""
        with self._lock:
            return self._source

    def floor(self) -> float:
        """The newest proven time, in seconds since the epoch (0.0 before anything was proven)."""
        with self._lock:
            return self._floor

    def prove(self, t: float, source: str) -> bool:
        """Raise the floor to ``t`` if ``t`` is newer; never lowers it.

        Args:
            t: a time in seconds since the epoch that arrived signed by a trusted party.
            source: who vouched for it, e.g. ``"tuf-timestamp v42"`` (kept for the log and the status).

        Returns:
            True when the floor rose (and was persisted), False when ``t`` was not newer or not finite.
        """
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            return False
        with self._lock:
            if t <= self._floor:
                return False
            body = json.dumps({"floor": float(t), "source": source}, sort_keys=True).encode()
            # Persist before raising the in-memory value, so memory never claims more than the disk holds.
            atomic_write(self._path, body)
            self._floor = float(t)
            self._source = source
            return True

    def now(self, clock_value: float) -> float:
        """The effective time for expiry checks: ``max(clock_value, floor)``."""
        f = self.floor()
        if not math.isfinite(clock_value):
            return f
        return max(float(clock_value), f)
