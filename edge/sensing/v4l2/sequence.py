"""Dropped-frame accounting from a capture driver's sequence numbers (sans-IO).

A V4L2 driver numbers every frame it captures (``v4l2_buffer.sequence``, 32 bits), including those it could not
deliver because no buffer was queued: a gap between two delivered frames is the number of frames lost in between.
"""

from __future__ import annotations

__all__ = ["SequenceTracker"]

_WRAP = 1 << 32


class SequenceTracker:
    """Counts frames lost between the sequence numbers a capture delivers.

    ``observe`` returns the frames lost just before each delivered one; ``dropped`` is their running total.
    ``restart`` forgets the last number (a reopened device starts again from 0), so a reopen is not a gap.
    """

    def __init__(self) -> None:
        self._last: int | None = None
        self.dropped = 0

    def observe(self, sequence: int) -> int:
        """Account for one delivered frame; returns how many frames were lost just before it."""
        if not 0 <= sequence < _WRAP:
            raise ValueError(f"a V4L2 sequence number is 32 bits, got {sequence}")
        gap = 0
        if self._last is not None:
            gap = (sequence - self._last - 1) % _WRAP
            if gap >= _WRAP // 2:
                gap = 0  # went backwards: the driver restarted its count (a stream restart), nothing was lost
        self._last = sequence
        self.dropped += gap
        return gap

    def restart(self) -> None:
        """The stream starts over (a reopen or STREAMON): the next number is not compared with the last."""
        self._last = None
