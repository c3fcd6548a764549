"""The resumable fetcher against the real loopback server: resume after cuts, restarts, limits, no stale resumes."""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from static_server import StaticServer
from tuf.api import exceptions

from edge.ota.fetch import ResumableFetcher

SIZE = 1_000_000


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StaticServer, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "blob.bin").write_bytes(data)
    with StaticServer(root) as srv:
        yield srv, data


@pytest.fixture
def fetcher(tmp_path: Path) -> ResumableFetcher:
    return ResumableFetcher(tmp_path / "partial", connect_timeout=5, read_timeout=5, chunk_size=16 * 1024)


def _download(f: ResumableFetcher, url: str, max_length: int = SIZE) -> bytes:
    with f.download_file(url, max_length) as fh:
        assert fh.tell() == 0
        return fh.read()


def test_plain_download_and_part_removed(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, data = served
    url = srv.url + "blob.bin"
    assert _download(fetcher, url) == data
    assert not fetcher.part_path(url).exists()
    assert fetcher.stats.target_bytes == SIZE and fetcher.stats.requests == 1


def test_resume_after_cut_transfers_only_the_remainder(
    served: tuple[StaticServer, bytes], fetcher: ResumableFetcher
) -> None:
    srv, data = served
    url = srv.url + "blob.bin"
    srv.cut_after("blob.bin", 300_000)
    with pytest.raises(exceptions.DownloadError) as ei:
        _download(fetcher, url)
    assert not isinstance(ei.value, exceptions.DownloadLengthMismatchError)
    part = fetcher.part_path(url)
    assert part.stat().st_size == 300_000  # kept for the next attempt
    assert _download(fetcher, url) == data
    assert [r.range for r in srv.requests] == [None, "bytes=300000-"]
    assert [r.status for r in srv.requests] == [200, 206]
    assert srv.bytes_sent("blob.bin") == SIZE  # 300 000 + the remainder, nothing twice
    assert fetcher.stats.last_resumed_from == 300_000 and fetcher.stats.last_received == SIZE - 300_000
    assert fetcher.stats.resumes == 1 and not part.exists()


def test_two_cuts_then_success(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, data = served
    url = srv.url + "blob.bin"
    for cut in (100_000, 250_000):
        srv.cut_after("blob.bin", cut)
        with pytest.raises(exceptions.DownloadError):
            _download(fetcher, url)
    assert _download(fetcher, url) == data
    assert srv.bytes_sent("blob.bin") == SIZE


def test_range_answered_200_restarts_cleanly(tmp_path: Path, fetcher: ResumableFetcher) -> None:
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "blob.bin").write_bytes(data)
    with StaticServer(root) as srv:
        url = srv.url + "blob.bin"
        # A stale .part with wrong bytes, and a server that ignores ranges (iterable bodies are served as 200).
        fetcher.partial_dir.mkdir(parents=True)
        fetcher.part_path(url).write_bytes(b"\xff" * 5000)
        srv.override("blob.bin", [data], times=1)
        assert _download(fetcher, url) == data
        assert srv.requests[0].range == "bytes=5000-" and srv.requests[0].status == 200
        assert fetcher.stats.resumes == 0 and fetcher.stats.last_resumed_from == 0


def test_unsatisfiable_range_restarts(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, data = served
    url = srv.url + "blob.bin"
    fetcher.partial_dir.mkdir(parents=True)
    fetcher.part_path(url).write_bytes(b"x" * 10)
    srv.override("blob.bin", data[:8], times=1)  # the file shrank under the URL: 416, then a clean restart
    assert _download(fetcher, url) == data
    assert [r.status for r in srv.requests] == [416, 200]
    assert fetcher.stats.restarts == 1


def test_part_from_failed_verification_is_not_resumed(
    served: tuple[StaticServer, bytes], fetcher: ResumableFetcher
) -> None:
    srv, data = served
    url = srv.url + "blob.bin"
    srv.override("blob.bin", b"\x00" * SIZE, times=1)

    class HashMismatchError(Exception):
        pass

    with pytest.raises(HashMismatchError), fetcher.download_file(url, SIZE) as fh:
        if hashlib.sha256(fh.read()).digest() != hashlib.sha256(data).digest():
            raise HashMismatchError
    assert not fetcher.part_path(url).exists()
    assert _download(fetcher, url) == data
    assert srv.requests[-1].range is None and srv.requests[-1].status == 200


def test_endless_data_stops_at_the_limit(tmp_path: Path, fetcher: ResumableFetcher) -> None:
    def endless() -> Iterator[bytes]:
        while True:
            yield b"A" * 65536

    with StaticServer(tmp_path) as srv:
        srv.override("big.bin", endless)
        url = srv.url + "big.bin"
        with pytest.raises(exceptions.DownloadLengthMismatchError):
            _download(fetcher, url, max_length=200_000)
        assert not fetcher.part_path(url).exists()  # never more than the limit on disk, and nothing kept
        assert fetcher.stats.target_bytes < 200_000 + 2 * 65536
        with pytest.raises(exceptions.DownloadLengthMismatchError):
            fetcher.download_bytes(url, 100_000)


def test_limit_enforced_with_content_length(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, _ = served
    url = srv.url + "blob.bin"
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        _download(fetcher, url, max_length=SIZE - 1)
    assert not fetcher.part_path(url).exists()


def test_http_errors_and_unreachable(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, _ = served
    with pytest.raises(exceptions.DownloadHTTPError) as ei:
        _download(fetcher, srv.url + "missing.bin")
    assert ei.value.status_code == 404
    srv.fail("blob.bin", 503)
    with pytest.raises(exceptions.DownloadHTTPError):
        fetcher.download_bytes(srv.url + "blob.bin", SIZE)
    port = srv.port
    srv.stop()
    with pytest.raises(exceptions.DownloadError):
        fetcher.download_bytes(f"http://127.0.0.1:{port}/blob.bin", SIZE)


def test_progress_reports_up_to_total(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, _ = served
    seen: list[tuple[int, int]] = []
    with fetcher.reporting(lambda done, total: seen.append((done, total))):
        _download(fetcher, srv.url + "blob.bin")
    assert seen[-1] == (SIZE, SIZE)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(seen))


def test_server_refuses_path_traversal(
    served: tuple[StaticServer, bytes], fetcher: ResumableFetcher, tmp_path: Path
) -> None:
    srv, _ = served
    (tmp_path / "secret.txt").write_text("no")
    for path in ("../secret.txt", "%2e%2e/secret.txt", "a/../../secret.txt"):
        with pytest.raises(exceptions.DownloadHTTPError):
            fetcher.download_bytes(srv.url + path, 100)
    assert all(r.status == 404 for r in srv.requests)


def test_throttle_paces_the_body(served: tuple[StaticServer, bytes], fetcher: ResumableFetcher) -> None:
    srv, data = served
    srv.throttle(4_000_000)
    t0 = time.monotonic()
    assert _download(fetcher, srv.url + "blob.bin") == data
    assert time.monotonic() - t0 >= 0.2  # 1 MB at 4 MB/s
