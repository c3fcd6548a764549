"""Named fault points of the installer, where a crash test stops the process to kill it with SIGKILL.

``checkpoint(name)`` costs one dictionary lookup in production. When the environment variable ``EDGE_OTA_HALT_AT``
equals ``name``, it writes ``HALT <name>`` to stderr and sleeps forever, so that the test kills the process at
exactly that point with a real ``kill -9`` (a simulated exception would run ``finally`` blocks a power cut never
runs). Every point is listed in :data:`FAULT_POINTS`; the crash tests iterate over it, so a point added in the code
must be added here, and :func:`checkpoint` refuses an unlisted name (a typo would otherwise never halt).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Final

__all__ = ["FAULT_POINTS", "HALT_ENV", "checkpoint", "state_points"]

HALT_ENV: Final = "EDGE_OTA_HALT_AT"

#: The states the updater persists (``edge.ota.state.STATES``, repeated to keep this module import-free).
_PERSISTED: Final = ("downloading", "verifying", "staged", "trial", "committed", "idle", "rolled_back")


def state_points(state: str) -> tuple[str, str]:
    """The two fault points of persisting ``state``: temp file written and fsynced, renamed over state.json."""
    return f"state.{state}.written", f"state.{state}.renamed"


FAULT_POINTS: Final[tuple[str, ...]] = (
    *(p for s in _PERSISTED for p in state_points(s)),
    # The model file's download: after the first chunk, at about half of its bytes, and between the files.
    "download.first_chunk",
    "download.progress",
    "download.model_done",
    # The staged slot manifest (after verification) and the committed one (after the trial).
    "slot.stage.written",
    "slot.stage.renamed",
    "trial.passed",
    "slot.commit.written",
    "slot.commit.renamed",
    # The atomic switch of models/active.
    "activate.link_made",
    "activate.renamed",
    "commit.on_commit_done",
    # A failed update: the staging slot is cleared after rolled_back is persisted.
    "rollback.slot_cleared",
)

_KNOWN: Final = frozenset(FAULT_POINTS)


def checkpoint(name: str) -> None:
    """Halt here forever when ``EDGE_OTA_HALT_AT`` names this point (a crash test then kills the process).

    Args:
        name: one of :data:`FAULT_POINTS`.

    Raises:
        ValueError: ``name`` is not listed in :data:`FAULT_POINTS` (a bug in the caller).
    """
    if name not in _KNOWN:
        raise ValueError(f"unknown fault point {name!r}: add it to FAULT_POINTS")
    if os.environ.get(HALT_ENV) != name:
        return
    sys.stderr.write(f"HALT {name}\n")
    sys.stderr.flush()
    while True:  # pragma: no cover -- ends only by SIGKILL
        time.sleep(3600)
