"""What every check of ``edge fleet doctor`` returns: a ``Finding`` (severity, what, detail, fix).

Its own module so that the checks (``_conf``, ``_pki``, ``_session``) and the I/O shell (the package) share it
without an import cycle. Nothing here prints or exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Finding", "Severity", "ok"]

Severity = Literal["ERROR", "WARN", "OK"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of the doctor.

    Attributes:
        severity: ``ERROR`` (a guarantee is broken or about to be), ``WARN`` (costs resends or needs attention soon)
            or ``OK``.
        what: the thing checked, e.g. ``broker max_queued_messages`` or ``certificate gateway/gw-1.pem``.
        detail: what was found.
        fix: what to do ("" for OK).
    """

    severity: Severity
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """The one-line form: ``SEVERITY what: detail; fix: what to do``."""
        return f"{self.severity} {self.what}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict[str, str]:
        """The JSON form."""
        return {"severity": self.severity, "what": self.what, "detail": self.detail, "fix": self.fix}


def ok(what: str, detail: str) -> Finding:
    """An ``OK`` finding (no fix)."""
    return Finding("OK", what, detail)
