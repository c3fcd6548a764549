"""The numeric bounds of the telemetry contract, stated once; the schema, the envelope, the verifier and the gateway's
store all use these names.

Why these values:
- ``MAX_EPOCH``: 1e11 s is the year 5138. A box clock beyond it is garbage, not a clock, and every stored time then
  fits a double exactly to the microsecond it was written with.
- ``MAX_COUNTER``: 2**53. At a thousand envelopes a second a box needs 285,000 years to reach it, so no honest box
  ever does; it is the largest integer a double (and so every JSON reader) holds exactly; and it keeps every ledger
  sum inside a signed 64-bit column whatever a box claims: the missing counters of a device are at most
  ``MAX_COUNTER``, and its announced dropped records at most ``MAX_COUNTER`` x ``MAX_RECORDS_PER_ENVELOPE``
  = 9.007e18 < 2**63 - 1 = 9.223e18.
- ``MAX_RECORDS_PER_ENVELOPE``: the most records any verifier accepts in one envelope (``TelemetryLimits.max_records``
  may lower it, never raise it), so a loss notice cannot announce more dropped records than the dropped envelopes
  could have held.
- ``INT64_MIN`` / ``INT64_MAX``: every integer a record carries is stored in a signed 64-bit column somewhere.
"""

from __future__ import annotations

from typing import Final

__all__ = ["INT64_MAX", "INT64_MIN", "MAX_COUNTER", "MAX_EPOCH", "MAX_RECORDS_PER_ENVELOPE", "UINT32_MAX"]

MAX_EPOCH: Final = 1e11
MAX_COUNTER: Final = 1 << 53
MAX_RECORDS_PER_ENVELOPE: Final = 1000
INT64_MAX: Final = (1 << 63) - 1
INT64_MIN: Final = -(1 << 63)
UINT32_MAX: Final = (1 << 32) - 1

# The claim of the module docstring, checked where Python evaluates it rather than trusted in a comment.
assert MAX_COUNTER * MAX_RECORDS_PER_ENVELOPE <= INT64_MAX
