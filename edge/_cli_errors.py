"""How the ``edge`` command line reports a failure: one line on stderr and a documented exit status (docs/cli.md).

``report(exc)`` turns any exception that left a command into ``(status, line)``:

- ``ConfigError`` -> 2 (usage or configuration: the message names the key);
- ``VerificationError`` -> 3 (what was checked does not verify);
- any other ``EdgeError`` -> 1;
- ``OSError`` -> 1, naming the path (or address), the cause (``strerror``) and a fix chosen by ``errno``;
- ``ImportError`` -> 1, naming the missing package and the extra of n3-edge that installs it;
- anything else is a bug -> 1 with "internal error", and the traceback only under ``EDGE_DEBUG=1``.

Every line passes through ``edge.log.redact``: a message may quote a database or broker URL with its password.
Only the standard library is imported at module level: ``edge --help`` must stay fast, and the error path loads
``edge.log`` only when there is an error to report.
"""

from __future__ import annotations

import errno
import os
import sys
from types import TracebackType

from edge.errors import (
    EXIT_FAILURE,
    EXIT_UNVERIFIED,
    EXIT_USAGE,
    ConfigError,
    EdgeError,
    VerificationError,
)

__all__ = [
    "DEBUG_ENV",
    "EXIT_INTERRUPTED",
    "debug",
    "extra_for",
    "print_traceback",
    "report",
    "silence_stdout",
    "stdout_gone",
]

DEBUG_ENV = "EDGE_DEBUG"
# What shells report for a process ended by SIGINT (128 + 2): a script can tell "interrupted" from "failed".
EXIT_INTERRUPTED = 130

# The top-level modules of pyproject.toml's optional dependencies, by the extra that installs them.
_EXTRAS: dict[str, str] = {
    "av": "camera",
    "simplejpeg": "camera",
    "psycopg": "fleet",
    "psycopg_binary": "fleet",
    "psycopg_c": "fleet",
    "psycopg_pool": "fleet",
    "prometheus_client": "fleet",
    "segno": "fleet",
}

# The fix an operator can apply, by errno; the line already names the path and the cause.
_FIXES: dict[int, str] = {
    errno.ENOENT: "check the path, or create what is missing",
    errno.EACCES: "give the user edge runs as access to it, or choose another path",
    errno.EPERM: "give the user edge runs as access to it, or choose another path",
    errno.EROFS: "the file system is mounted read-only: choose a path on a writable one",
    errno.ENOTDIR: "a part of the path is a regular file, not a directory: choose another path or move the file",
    errno.EISDIR: "it is a directory: name a file",
    errno.EEXIST: "it exists already: remove it or choose another path",
    errno.ENOSPC: "the disk is full: free space on it",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
    errno.EADDRINUSE: "another process listens there: stop it or choose another port",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's: choose a local address",
    errno.ECONNREFUSED: "nothing listens there: start the service or correct the address",
    errno.ETIMEDOUT: "the other side does not answer: check the address and the network",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n, LimitNOFILE=)",
}


def debug() -> bool:
    """Whether ``EDGE_DEBUG`` asks for tracebacks (set and neither empty nor ``0``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _redact(text: str) -> str:
    from edge.log import redact  # noqa: PLC0415 -- logging loads only when there is an error to report

    return redact(text)


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``edge fleet status | head`` after ``head`` exited).

    ``poll`` reports ``POLLERR`` for the write end of a pipe without readers; a ``BrokenPipeError`` from a socket
    leaves stdout healthy and is reported as the failure it is.
    """
    import select  # noqa: PLC0415

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & select.POLLERR for _, mask in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again (the Python docs' recipe)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # a replaced stdout (a test's capture) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _top(module: str | None) -> str | None:
    return module.partition(".")[0] if module else None


def _import_culprits(exc: ImportError) -> list[str]:
    """The top-level modules an import failure may be blamed on, the most specific first."""
    names = [_top(exc.name)] if exc.name else []
    # A package that imports but fails inside (psycopg without libpq, a broken av build) raises an ImportError
    # whose name is None or a submodule: the modules whose code was running when it failed name the package.
    tb: TracebackType | None = exc.__traceback__
    frames: list[str] = []
    while tb is not None:
        frames.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    names.extend(_top(m) for m in reversed(frames))
    return [n for n in names if n and n not in {"edge", "importlib"}]


def extra_for(exc: ImportError) -> tuple[str, str | None]:
    """The package an import failure is about and the n3-edge extra that installs it (None: a core dependency).

    Args:
        exc: the failure, as raised.

    Returns:
        ``(package, extra)``; the package is ``"?"`` when nothing names it.
    """
    culprits = _import_culprits(exc)
    for name in culprits:
        if name in _EXTRAS:
            return name, _EXTRAS[name]
    return (culprits[0] if culprits else "?"), None


def _os_error_line(exc: OSError) -> str:
    where = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    cause = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0)
    head = f"{' -> '.join(where)}: " if where else ""
    return f"{head}{cause}" + (f" ({fix})" if fix else "")


def report(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line (without the ``edge: `` prefix) for an exception that ended a command.

    Args:
        exc: what the command raised (not ``SystemExit`` or ``KeyboardInterrupt``: main handles those itself).

    Returns:
        ``(status, line)``: status 2 for ``ConfigError``, 3 for ``VerificationError``, 1 for the rest.
    """
    if isinstance(exc, ConfigError):
        return EXIT_USAGE, _redact(f"error: {exc}")
    if isinstance(exc, VerificationError):
        return EXIT_UNVERIFIED, _redact(f"error: {exc}")
    if isinstance(exc, EdgeError):
        return EXIT_FAILURE, _redact(f"error: {exc}")
    if isinstance(exc, ImportError):
        package, extra = extra_for(exc)
        fix = (
            f"install the {extra} extra: pip install 'n3-edge[{extra}]'"
            if extra
            else "a dependency of n3-edge is missing or broken: reinstall it (pip install --force-reinstall n3-edge)"
        )
        what = f"cannot import {package}" if package != "?" else "an import failed"
        return EXIT_FAILURE, _redact(f"error: {what} ({exc}): {fix}")
    if isinstance(exc, OSError):
        return EXIT_FAILURE, _redact(f"error: {_os_error_line(exc)}")
    detail = str(exc)
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return EXIT_FAILURE, _redact(f"internal error: {what} (this is a bug; rerun with {DEBUG_ENV}=1 for the traceback)")


def print_traceback(exc: BaseException) -> None:
    """Print ``exc``'s traceback to stderr, redacted (what ``EDGE_DEBUG=1`` shows before the one line)."""
    import traceback  # noqa: PLC0415 -- only EDGE_DEBUG=1 needs it

    text = "".join(traceback.format_exception(exc))
    sys.stderr.write(_redact(text))
