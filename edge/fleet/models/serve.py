"""``edge fleet models serve``: the repository directory over plain HTTP, for a lab without a web server.

In production the repository is static files behind nginx, a CDN or object storage; the boxes verify everything
they fetch with TUF, so the server needs no trust of its own. What it must not do is serve more than the repository:

- read-only: GET and HEAD; every other method is answered 501 by the standard handler;
- only regular files below the repository directory, after resolving symbolic links: ``..``, absolute paths and
  links leaving the directory are 404, and so is every directory (no listing, not even inside it);
- ``Range: bytes=N-`` is answered 206 from offset N (the box resumes an interrupted model download with it);
  any other range gets the whole file with 200, which the box also accepts (it starts over);
- one thread per connection (``ThreadingHTTPServer``), so a slow box does not hold up the others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Final
from urllib.parse import unquote, urlsplit

from edge.errors import ConfigError, ResourceError

__all__ = ["RepositoryServer", "parse_listen"]

log = logging.getLogger("edge.fleet.serve")

_RANGE: Final = re.compile(r"bytes=(\d{1,19})-")
_CHUNK: Final = 1 << 16


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) of ``--listen``.

    Raises:
        ConfigError: not ``HOST:PORT`` with a port in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError("--listen", text, "HOST:PORT, e.g. 127.0.0.1:8080 (0.0.0.0:8080 for the lab's network)")
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-repository"
    sys_version = ""

    def do_GET(self) -> None:
        self._send(body=True)

    def do_HEAD(self) -> None:
        self._send(body=False)

    def _file(self) -> Path | None:
        """The regular file below the root the request names, or None (404)."""
        raw = unquote(urlsplit(self.path).path)
        if "\x00" in raw:
            return None
        root = self.server.root
        try:
            path = (root / raw.lstrip("/")).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return None
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    def _send(self, *, body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        try:
            f = path.open("rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            m = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            start = int(m.group(1)) if m else 0
            if m and start >= size:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT if m else HTTPStatus.OK)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            kind = "application/json" if path.suffix == ".json" else "application/octet-stream"
            self.send_header("Content-Type", kind)
            self.send_header("Accept-Ranges", "bytes")
            # timestamp.json changes in place: a cache between the lab and the boxes must not keep it.
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if body:
                f.seek(start)
                self._copy(f)

    def _copy(self, f: BinaryIO) -> None:
        with contextlib.suppress(ConnectionError):  # the box went away mid-file: it resumes with a Range later
            shutil.copyfileobj(f, self.wfile, _CHUNK)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a box stuck mid-download does not hold up the exit
    root: Path


class _Server6(_Server):
    address_family = socket.AF_INET6


class RepositoryServer:
    """Serves ``directory`` read-only on ``host:port`` (port 0: any free port, see :attr:`url`).

    Args:
        directory: the repository directory (``<fleet dir>/repository``).
        host, port: the address to listen on.

    Raises:
        ResourceError: the address is in use or not one of this machine's (the message names it).
    """

    def __init__(self, directory: Path, host: str, port: int) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as e:
            fix = {
                errno.EADDRINUSE: "another process listens there: stop it or choose another --listen",
                errno.EADDRNOTAVAIL: "not an address of this machine: choose a local one",
                errno.EACCES: "ports below 1024 need privileges: choose a port above 1023",
            }.get(e.errno or 0, "choose another --listen")
            raise ResourceError(f"cannot listen on {where}: {e.strerror or e} ({fix})") from e
        self._server.root = directory.resolve()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL boxes use as ``[ota] repository``."""
        host, port = str(self._server.server_address[0]), int(self._server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def serve_forever(self) -> None:
        """Serve on the calling thread until :meth:`close` (from another thread) or an exception."""
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> RepositoryServer:
        """Serve on a background thread (tests and embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="edge-repository", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
