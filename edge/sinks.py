"""Where records go. The telemetry issue adds the signed, durable sink; this module has the interface and JSON lines.

A sink is called from one thread (the pipeline's emit stage) with records in order.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Protocol, TextIO

from edge.wire.records import Record, to_dict

__all__ = ["JsonLinesSink", "Sink"]


class Sink(Protocol):
    """Receives every record the pipeline produces."""

    def write(self, records: Sequence[Record]) -> None:
        """Take a batch of records (in order)."""
        ...

    def close(self) -> None:
        """Flush and release resources."""
        ...


class JsonLinesSink:
    """One JSON object per line, to a file or standard output (path ``-``)."""

    def __init__(self, path: str = "-") -> None:
        self._own = path != "-"
        self._out: TextIO = open(path, "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def write(self, records: Sequence[Record]) -> None:
        """Write the batch and flush, so a reader of the file sees whole records promptly."""
        self._out.write("".join(json.dumps(to_dict(r), separators=(",", ":")) + "\n" for r in records))
        self._out.flush()

    def close(self) -> None:
        """Close the file (standard output stays open)."""
        if self._own:
            self._out.close()
        else:
            self._out.flush()
