"""A loopback static HTTP server for OTA tests, demos and benchmarks, with fault hooks.

In production the TUF repository (``FLEET/repository/``) is plain static files served by nginx, a CDN or object
storage; nothing on the server side needs to understand TUF. This server stands in for them on 127.0.0.1 and adds what
tests need to play the attacker or the flaky network:

- ``override(path, body)``: serve other bytes for a path (tampered files, or an endless generator),
- ``cut_after(path, n)``: send ``n`` body bytes, then drop the connection (a network cut or power cut),
- ``throttle(bytes_per_s)``: pace every body,
- ``fail(path, status)``: answer with an HTTP error.

Hooks match a request when its path (relative to the root, no leading slash) ends with the hook's ``path``, so
``cut_after("model.onnx", 100)`` also hits the hash-prefixed ``digits/1.0.0/<sha256>.model.onnx``. It serves
``Range: bytes=N-`` (and ``N-M``) with 206 and ``Content-Range``, records every request, and never serves anything
outside its root (``..`` and symlinks leaving the root get 404).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

__all__ = ["Request", "StaticServer"]

Body = bytes | Iterable[bytes] | Callable[[], Iterable[bytes]]
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Request:
    """One served request: the path (relative, no leading slash), the status sent and the body bytes sent."""

    path: str
    status: int
    bytes_sent: int
    range: str | None = None


@dataclass
class _Entry:
    path: str
    status: int
    range: str | None
    bytes_sent: int = 0


@dataclass
class _Hook:
    value: object
    times: int | None  # None: every request


class StaticServer:
    """Serve the files under ``root`` on ``127.0.0.1`` (a free port); use as a context manager or start()/stop().

    Args:
        root: the directory to serve (e.g. ``FleetRepository.repository_dir``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._requests: list[_Entry] = []
        self._overrides: dict[str, _Hook] = {}
        self._cuts: dict[str, _Hook] = {}
        self._fails: dict[str, _Hook] = {}
        self._rate: float | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> StaticServer:
        """Bind a free loopback port and serve in a background thread."""
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="static-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT/``."""
        return f"http://127.0.0.1:{self.port}/"

    # -- fault hooks -----------------------------------------------------------------------------------------------

    def override(self, path: str, body: Body, *, times: int | None = None) -> None:
        """Serve ``body`` instead of the file for paths ending in ``path``.

        Args:
            path: path suffix to match.
            body: bytes (served like a file, ranges included), or an iterable of chunks, or a callable returning
                one (served without Content-Length until exhausted or the client leaves: endless data).
            times: how many requests to affect (None: all).
        """
        with self._lock:
            self._overrides[path] = _Hook(body, times)

    def cut_after(self, path: str, n_bytes: int, *, times: int | None = 1) -> None:
        """Send the headers and ``n_bytes`` of the body, then drop the connection (by default once)."""
        with self._lock:
            self._cuts[path] = _Hook(n_bytes, times)

    def fail(self, path: str, status: int, *, times: int | None = None) -> None:
        """Answer requests for paths ending in ``path`` with ``status`` and no body."""
        with self._lock:
            self._fails[path] = _Hook(status, times)

    def throttle(self, bytes_per_s: float | None) -> None:
        """Pace every response body to about ``bytes_per_s`` (None: full speed)."""
        with self._lock:
            self._rate = bytes_per_s

    def clear(self) -> None:
        """Remove every fault hook and the throttle (the request log stays)."""
        with self._lock:
            self._overrides.clear()
            self._cuts.clear()
            self._fails.clear()
            self._rate = None

    # -- observations ----------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """The request log, in the order the responses started.

        An entry is logged before its headers are sent and its byte count grows before each write, so whatever a
        client has received is already in the log (no waiting for the server thread).
        """
        with self._lock:
            return [Request(e.path, e.status, e.bytes_sent, e.range) for e in self._requests]

    def bytes_sent(self, path_suffix: str | None = None) -> int:
        """Total body bytes sent (for paths ending in ``path_suffix`` when given)."""
        return sum(r.bytes_sent for r in self.requests if path_suffix is None or r.path.endswith(path_suffix))

    def paths(self, path_suffix: str = "") -> list[str]:
        """The paths requested (ending in ``path_suffix``), in order."""
        return [r.path for r in self.requests if r.path.endswith(path_suffix)]

    # -- used by the handler ---------------------------------------------------------------------------------------

    def _take(self, hooks: dict[str, _Hook], path: str) -> object | None:
        with self._lock:
            for key, hook in hooks.items():
                if path.endswith(key):
                    if hook.times is not None:
                        hook.times -= 1
                        if hook.times <= 0:
                            del hooks[key]
                    return hook.value
        return None

    def _record(self, path: str, status: int, rng: str | None) -> _Entry:
        entry = _Entry(path, status, rng)
        with self._lock:
            self._requests.append(entry)
        return entry

    def _count(self, entry: _Entry, n: int) -> None:
        with self._lock:
            entry.bytes_sent += n

    def _resolve(self, rel: str) -> Path | None:
        if any(part in ("..", "") for part in rel.split("/")) or "\\" in rel or "\x00" in rel:
            return None
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root) or not p.is_file():
            return None
        return p


class _Handler(BaseHTTPRequestHandler):
    owner: StaticServer
    server_version = "edge-test-static/1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request log is in owner.requests

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        owner = self.owner
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        rng = self.headers.get("Range")
        status = owner._take(owner._fails, rel)
        if isinstance(status, int):
            owner._record(rel, status, rng)
            self._head(status, 0)
            return
        body = owner._take(owner._overrides, rel)
        if body is None:
            path = owner._resolve(rel)
            if path is None:
                owner._record(rel, 404, rng)
                self._head(404, 0)
                return
            body = path.read_bytes()
        if not isinstance(body, bytes | bytearray):
            chunks = body() if callable(body) else body
            entry = owner._record(rel, 200, rng)
            self._head(200, None)
            if not head:
                self._send(entry, iter(chunks), owner._take(owner._cuts, rel))  # type: ignore[arg-type]
            return
        data = bytes(body)
        code, start, end = 200, 0, len(data)
        if rng is not None:
            parsed = _parse_range(rng, len(data))
            if parsed is None:
                owner._record(rel, 416, rng)
                self._head(416, 0, extra={"Content-Range": f"bytes */{len(data)}"})
                return
            code, (start, end) = 206, parsed
        entry = owner._record(rel, code, rng)
        extra = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"} if code == 206 else None
        self._head(code, end - start, extra=extra)
        if not head:
            self._send(entry, _slices(data, start, end), owner._take(owner._cuts, rel))

    def _head(self, status: int, length: int | None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _send(self, entry: _Entry, chunks: Iterator[bytes], cut: object | None) -> None:
        """Write chunks, honouring the throttle and a cut; bytes are logged before they are written."""
        limit = cut if isinstance(cut, int) else None
        sent = 0
        t0 = time.monotonic()
        try:
            for chunk in chunks:
                if limit is not None and sent + len(chunk) >= limit:
                    part = chunk[: limit - sent]
                    self.owner._count(entry, len(part))
                    self.wfile.write(part)
                    self.wfile.flush()
                    self._drop()
                    return
                self.owner._count(entry, len(chunk))
                self.wfile.write(chunk)
                sent += len(chunk)
                rate = self.owner._rate
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)  # server-side pacing, not a test waiting for a condition
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (e.g. it refused endless data)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=N-`` or ``bytes=N-M`` as a half-open ``(start, end)``; None when unsatisfiable or malformed."""
    unit, _, spec = header.strip().partition("=")
    first, sep, last = spec.partition("-")
    if unit != "bytes" or not sep or not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        return None
    return start, end


def _slices(data: bytes, start: int, end: int) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(start, end, _CHUNK):
        yield bytes(view[i : min(i + _CHUNK, end)])
