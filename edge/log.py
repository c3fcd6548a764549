"""Structured logs: one JSON object per line (or ``key=value`` text for a terminal).

Call ``event(logger, level, message, **fields)``; the fields become keys of the log line, so an operator can filter
on ``backend``, ``model`` or ``reason`` instead of parsing prose.

No secret reaches a log line: both formatters pass the message, every string field (also inside lists and mappings)
and the traceback through :func:`redact`, which masks the credentials of URLs (``user:password@``, secret query
parameters such as ``?password=``), ``password=`` assignments and PEM private keys. Error messages that leave the
process another way (telemetry events, the OTA state file) are redacted where they are made, with the same helper.

Under systemd, when the log stream is the journal (``JOURNAL_STREAM`` names the stream's device and inode), every
line starts with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug: sd-daemon(3)),
which journald strips and stores, so ``journalctl -p warning`` shows warnings and errors only. A stream that is not
the journal (a pipe to another program, a file) gets no prefix, even if the variable was inherited.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

__all__ = ["REDACTED", "Throttle", "configure", "event", "redact", "to_journal"]

_FIELDS = "edge_fields"

REDACTED: Final = "***"
# Query parameters (and ``name=value`` pairs) whose value is a secret, compared without case. ``key`` and ``sig``
# are API keys and signatures (presigned URLs), not the telemetry "key" of a setting: those never sit in a query.
_CREDENTIAL_PARAMS: Final = (
    "password|passwd|pwd|pass|secret|client_secret|token|access_token|refresh_token|id_token|api_key|apikey|"
    "api-key|key|auth|authorization|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|credential"
)
# scheme://userinfo@ : the userinfo runs to the last "@" before the path, query, fragment or a blank.
_USERINFO: Final = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://)([^/?#\s]*)@")
_QUERY_SECRET: Final = re.compile(rf"(?i)([?&;](?:{_CREDENTIAL_PARAMS})=)[^&#\s'\"<>]*")
# Libpq-style "password=..." and the like outside a query (a DSN, an error quoting a command line).
_ASSIGNED_SECRET: Final = re.compile(r"(?i)(\b(?:password|passwd|pwd|secret|token)\s*=\s*)[^\s&;,'\"<>]+")
# Field names (of event() and of mappings inside fields) whose whole value is a secret. Narrower than the query
# parameters: a setting's "key" is logged by name and is no secret.
_SECRET_NAME: Final = re.compile(
    r"(?i)(?:\w*_)?(?:password|passwd|secret|token|api_?key|private_?key|credentials?|authorization)"
)
_PRIVATE_KEY: Final = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S)


def _mask_userinfo(m: re.Match[str]) -> str:
    user, colon, _secret = m.group(2).partition(":")
    # "user:password@" keeps the user; a lone "token@" (a common way to pass a token) is masked whole.
    return f"{m.group(1)}{user}:{REDACTED}@" if colon else f"{m.group(1)}{REDACTED}@"


def redact(text: str) -> str:
    """``text`` with every credential masked: a URL's ``user:password@`` (``token@``), secret query parameters
    (``?password=``, ``&token=``, ``&sig=``...), ``password=`` assignments and PEM private key blocks.

    Use it on anything built from configuration or remote input before it is logged or put into an error: a URL
    alone or a whole message.

    Args:
        text: a URL or free text.

    Returns:
        The text, unchanged where nothing matched.
    """
    # Every pattern needs one of these: most log lines hold none, and skip the regular expressions entirely.
    if "@" not in text and "=" not in text and "PRIVATE KEY" not in text:
        return text
    text = _PRIVATE_KEY.sub(f"-----BEGIN \\1PRIVATE KEY----- {REDACTED} -----END \\1PRIVATE KEY-----", text)
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _QUERY_SECRET.sub(rf"\g<1>{REDACTED}", text)
    return _ASSIGNED_SECRET.sub(rf"\g<1>{REDACTED}", text)


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (kept as keys in the JSON output; redacted by the formatters)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={_FIELDS: fields}, stacklevel=2)


class Throttle:
    """The one log throttle: per key, the first ``first`` occurrences are logged, then at most one per ``every_s``,
    which reports how many were suppressed since the last one logged. A flood of one kind of reject (a hostile box, a
    noisy serial line, a broken camera) then costs a line per interval, and nothing goes uncounted. Thread-safe; the
    clock is injected, so tests drive it.

    Args:
        every_s: the least time between two logged occurrences of one key, after the first ``first``.
        first: occurrences of each key logged in full before the interval applies.
        clock: monotonic seconds.
        max_keys: keys remembered; beyond it all are forgotten at once (each then logs again): bounded memory
            whatever the keys (device ids, topics) an attacker chooses.
    """

    def __init__(
        self,
        every_s: float,
        *,
        first: int = 1,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self._every = every_s
        self._first = first
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, ...], int] = {}
        self._last: dict[tuple[str, ...], float] = {}
        self._suppressed: dict[tuple[str, ...], int] = {}

    def allow(self, *key: str, n: int = 1) -> int | None:
        """Record ``n`` occurrences of ``key``; None means do not log, else how many were suppressed before these.

        Args:
            *key: what is counted apart (a reason, a device and a verdict...).
            n: occurrences at once (a counter read periodically).
        """
        with self._lock:
            now = self._clock()
            seen = self._seen.get(key, 0)
            if len(self._seen) >= self._max_keys and seen == 0:
                self._seen.clear()
                self._last.clear()
                self._suppressed.clear()
            self._seen[key] = seen + n
            last = self._last.get(key)
            if seen >= self._first and last is not None and now - last < self._every:
                self._suppressed[key] = self._suppressed.get(key, 0) + n
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0) + n - 1


def _secret_name(name: object) -> bool:
    return isinstance(name, str) and _SECRET_NAME.fullmatch(name) is not None


def _redact_value(value: Any) -> Any:
    """A JSON log field with its strings redacted, also inside lists and mappings (where a key that names a secret,
    ``password`` or ``api_key``, has its whole value masked); anything else as ``json`` would show it (``str``)."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _secret_name(k) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: Mapping[str, Any] = getattr(record, _FIELDS, {})
    return {k: REDACTED if _secret_name(k) else _redact_value(v) for k, v in fields.items()}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{stamp} {record.levelname.lower():7} {record.name}: {redact(record.getMessage())}"
        if fields:
            text += " " + fields
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        return text


# Libraries the box uses whose messages name URLs (urllib3's retry warnings carry the request path and query; tuf's
# debug lines the download URL): their records go through the same redacting handler, never Python's last-resort
# handler, which would print them to stderr verbatim.
_LIBRARY_LOGGERS: Final = ("urllib3", "tuf")


# sd-daemon(3) priorities by logging level (syslog's numbers); a level between two takes the lower one's.
_JOURNAL_PRIORITIES: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class _JournalFormatter(logging.Formatter):
    """Another formatter's output with the syslog priority prefix on each line (a multi-line traceback is several
    journal entries: each keeps the record's priority)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _JOURNAL_PRIORITIES if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in self._inner.format(record).split("\n"))


def to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is connected to the journal: ``JOURNAL_STREAM`` is ``<device>:<inode>`` of its descriptor.

    Args:
        stream: where the logs go.
        environ: the process environment.
    """
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO) or a closed one: not the journal
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send edge's logs to ``stream`` (stderr by default) in ``fmt`` ("json" or "text") at ``level``.

    The warnings of the libraries in ``_LIBRARY_LOGGERS`` go to the same handler, so they are redacted too. When the
    stream is the journal (:func:`to_journal`), each line is prefixed with its syslog priority.
    """
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = _JsonFormatter() if fmt == "json" else _TextFormatter()
    handler.setFormatter(_JournalFormatter(formatter) if to_journal(out) else formatter)
    root = logging.getLogger("edge")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        # Their info and debug lines are per request: only warnings and errors are worth a box's log.
        lib.setLevel(max(logging.WARNING, root.level))
        lib.propagate = False
