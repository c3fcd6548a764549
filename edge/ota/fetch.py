"""A TUF fetcher that resumes interrupted target downloads and enforces length limits while streaming.

Invariants:

- A target download streams into ``<partial_dir>/<sha256(url)>.part``. When that file exists, the next attempt asks
  for ``Range: bytes=<size>-`` and appends the 206 answer; a 200 answer (a server without ranges) starts over.
- More bytes than ``max_length`` are never written to disk: the download stops, the ``.part`` is deleted and
  ``DownloadLengthMismatchError`` is raised the moment the limit is passed (the "endless data" attack).
- A transport failure while receiving (connection cut, timeout) raises ``DownloadError`` and KEEPS the ``.part``,
  so a power cut or a dropped link costs only the bytes not yet received.
- Whatever happens after the bytes are handed to ngclient (hash check, copy), the ``.part`` is deleted on the way
  out: a file that failed verification is never resumed.
- Resuming is safe because consistent-snapshot target URLs carry the content hash (``<sha256>.<name>``): one URL
  names one content, so the bytes already on disk and the remainder belong to the same file. Even if a server broke
  that rule, ngclient's length and hash check over the whole file catches the mix, and the ``.part`` is dropped.

Metadata downloads (``download_bytes``) are small and go to memory without resuming.

Every error message names its URL through ``edge.log.redact``: the messages travel on into logs, the OTA state file
and telemetry, and the repository URL may carry credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from edge.log import redact

__all__ = ["FetchStats", "ResumableFetcher"]

Progress = Callable[[int, int], None]

_CONTENT_RANGE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(slots=True)
class FetchStats:
    """What the fetcher moved over the network (counters only grow, except ``last_*``).

    Attributes:
        requests: HTTP requests made.
        bytes_received: body bytes received over all requests (metadata and targets).
        target_bytes: body bytes received for target downloads.
        resumes: target downloads that continued a ``.part`` file with a 206 answer.
        restarts: target downloads whose Range request was answered 200 (or refused), so they started over.
        last_received: body bytes received by the latest target download call.
        last_resumed_from: the offset the latest target download resumed from (0: from the start).
    """

    requests: int = 0
    bytes_received: int = 0
    target_bytes: int = 0
    resumes: int = 0
    restarts: int = 0
    last_received: int = 0
    last_resumed_from: int = 0


class ResumableFetcher(FetcherInterface):
    """An urllib3 fetcher for ``tuf.ngclient.Updater`` with resumable target downloads.

    Args:
        partial_dir: where ``.part`` files of interrupted downloads live (created if missing; keep it on the same
            persistent disk as the downloads so a power cut keeps them).
        connect_timeout: seconds to wait for a connection.
        read_timeout: seconds of silence allowed between two received bytes.
        chunk_size: bytes read per step while streaming.
        pool: an urllib3 pool manager to use (tests, TLS settings); a plain one by default.
    """

    def __init__(
        self,
        partial_dir: Path,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        chunk_size: int = 256 * 1024,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        self.partial_dir = Path(partial_dir)
        self.chunk_size = chunk_size
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        # Retry only what cannot have delivered body bytes (connecting, redirects); a read that failed half-way is
        # resumed by the caller's next attempt from the .part, not replayed from zero here.
        self._retries = urllib3.Retry(total=3, connect=2, read=0, status=0, other=0, redirect=3)
        self._pool = pool if pool is not None else urllib3.PoolManager()
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self.stats = FetchStats()

    def part_path(self, url: str) -> Path:
        """The ``.part`` file an interrupted download of ``url`` continues from."""
        return self.partial_dir / f"{hashlib.sha256(url.encode()).hexdigest()}.part"

    @contextmanager
    def reporting(self, progress: Progress | None) -> Iterator[None]:
        """Call ``progress(received_bytes, total_bytes)`` while target downloads inside this block stream."""
        self._progress = progress
        try:
            yield
        finally:
            self._progress = None

    def _count(self, n: int, *, target: bool) -> None:
        with self._lock:
            self.stats.bytes_received += n
            if target:
                self.stats.target_bytes += n
                self.stats.last_received += n

    def _request(self, url: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        with self._lock:
            self.stats.requests += 1
        try:
            return self._pool.request(
                "GET",
                url,
                headers=headers,
                preload_content=False,
                timeout=self._timeout,
                retries=self._retries,
            )
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.TimeoutError):
                raise exceptions.SlowRetrievalError(redact(f"timed out connecting for {url}")) from e
            raise exceptions.DownloadError(redact(f"cannot reach {url}: {e.reason}")) from e
        except urllib3.exceptions.TimeoutError as e:
            raise exceptions.SlowRetrievalError(redact(f"timed out waiting for {url}")) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise exceptions.DownloadError(redact(f"cannot reach {url}: {e}")) from e

    def _stream(self, response: urllib3.BaseHTTPResponse, url: str) -> Generator[bytes, None, None]:
        """The body of ``response`` in chunks; transport failures become ``DownloadError`` (always releases it)."""
        complete = False
        try:
            # read1 hands over whatever arrived, so a cut loses no received bytes (stream() drops a partial chunk).
            while chunk := response.read1(self.chunk_size):
                yield chunk
            complete = True
        except urllib3.exceptions.TimeoutError as e:
            raise exceptions.SlowRetrievalError(redact(f"{url}: no data for too long")) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            # A closed connection before Content-Length bytes arrived is a ProtocolError (IncompleteRead): a cut.
            raise exceptions.DownloadError(redact(f"{url}: connection lost: {e}")) from e
        finally:
            if not complete:
                # Unread body bytes (maybe endless) must not go back to the pool: drop the connection instead.
                response.close()
            response.release_conn()

    def _fetch(self, url: str) -> Generator[bytes, None, None]:
        """Stream ``url`` (the FetcherInterface primitive; used for metadata).

        Raises:
            DownloadHTTPError: the server answered with an error status.
            DownloadError: the server cannot be reached.
        """
        response = self._request(url)
        if response.status >= 400:
            response.release_conn()
            raise exceptions.DownloadHTTPError(redact(f"HTTP {response.status} for {url}"), response.status)
        return self._stream(response, url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Download a small file (metadata) into memory, at most ``max_length`` bytes.

        Raises:
            DownloadLengthMismatchError: the server sent more than ``max_length`` bytes.
            DownloadHTTPError: the server answered with an error status.
            DownloadError: the transfer failed.
        """
        buf = bytearray()
        with contextlib.closing(self._fetch(url)) as chunks:
            for chunk in chunks:
                self._count(len(chunk), target=False)
                if len(buf) + len(chunk) > max_length:
                    raise exceptions.DownloadLengthMismatchError(
                        redact(f"{url}: more than the allowed {max_length} bytes")
                    )
                buf += chunk
        return bytes(buf)

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` into its ``.part`` file, resuming it if it exists; yield it open at offset 0.

        The ``.part`` is deleted when the ``with`` block ends, whether the caller's verification passed or not.

        Args:
            url: the target's URL.
            max_length: the target's length from signed metadata: no more bytes are accepted.

        Raises:
            DownloadLengthMismatchError: the server sent more than ``max_length`` bytes (the ``.part`` is deleted).
            DownloadHTTPError: the server answered with an error status.
            DownloadError: the transfer failed; the ``.part`` is kept for the next attempt.
        """
        part = self.part_path(url)
        self._receive(url, part, max_length)
        try:
            with part.open("rb") as f:
                yield f
        finally:
            part.unlink(missing_ok=True)

    def _receive(self, url: str, part: Path, max_length: int) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.stats.last_received = 0
            self.stats.last_resumed_from = 0
        offset = part.stat().st_size if part.exists() else 0
        if offset > max_length:
            part.unlink()
            offset = 0
        if offset == max_length and offset > 0:
            # Complete already (cut right after the last byte); ngclient's hash check decides whether it is good.
            return
        response = self._request(url, {"Range": f"bytes={offset}-"} if offset else None)
        if offset and not self._resumable(response, offset):
            response.release_conn()
            with self._lock:
                self.stats.restarts += 1
            part.unlink(missing_ok=True)
            offset = 0
            response = self._request(url)
        elif offset:
            with self._lock:
                self.stats.resumes += 1
                self.stats.last_resumed_from = offset
        if response.status >= 400:
            response.release_conn()
            raise exceptions.DownloadHTTPError(redact(f"HTTP {response.status} for {url}"), response.status)
        if response.status == 200:
            offset = 0
        self._append(response, url, part, offset, max_length)

    @staticmethod
    def _resumable(response: urllib3.BaseHTTPResponse, offset: int) -> bool:
        """Whether a Range answer continues exactly at ``offset`` (anything else restarts from zero)."""
        if response.status != 206:
            # 200: the server ignores ranges; 416: the .part is longer than the file; both mean start over.
            return False
        m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        return m is not None and int(m.group(1)) == offset

    def _append(self, response: urllib3.BaseHTTPResponse, url: str, part: Path, offset: int, max_length: int) -> None:
        received = offset
        progress = self._progress
        # "ab" after a truncate-to-offset: the file holds exactly the bytes we count, whatever a crash left.
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.truncate(offset)
            f.seek(offset)
            try:
                with contextlib.closing(self._stream(response, url)) as chunks:
                    for chunk in chunks:
                        self._count(len(chunk), target=True)
                        if received + len(chunk) > max_length:
                            raise exceptions.DownloadLengthMismatchError(
                                redact(f"{url}: more than the allowed {max_length} bytes arrived")
                            )
                        f.write(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(received, max_length)
            except exceptions.DownloadLengthMismatchError:
                f.close()
                part.unlink(missing_ok=True)
                raise
            except exceptions.DownloadError:
                # Keep what arrived, durably: the next attempt (maybe after a power cut) resumes from here.
                with contextlib.suppress(OSError):
                    f.flush()
                    os.fsync(f.fileno())
                raise
            f.flush()
            os.fsync(f.fileno())
