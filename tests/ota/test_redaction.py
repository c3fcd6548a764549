"""A repository URL with credentials (``user:password@`` and ``?password=``) never appears in an OTA error's text or
in a log line, whatever fails: an HTTP error, endless data, an unreachable server, a failed metadata refresh."""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from ota_env import OtaEnv
from tuf.api import exceptions

from edge.log import configure, event
from edge.ota.clock import TimeFloor
from edge.ota.errors import UpdateRejected
from edge.ota.fetch import ResumableFetcher
from edge.ota.trust import TrustClient, rejection

SECRETS = ("hunter2", "s3cret")


def with_credentials(base: str) -> str:
    """``http://127.0.0.1:PORT/`` -> ``http://admin:hunter2@127.0.0.1:PORT/``."""
    return base.replace("http://", "http://admin:hunter2@")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The service's log configuration, into a buffer; the loggers are restored afterwards."""
    names = ("edge", "urllib3", "tuf")
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names
    }
    out = io.StringIO()
    configure("debug", "json", stream=out)
    yield out
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def assert_clean(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, (secret, text)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fetcher_errors_never_carry_the_credentials(ota_env: OtaEnv, tmp_path: Path, captured: io.StringIO) -> None:
    fetcher = ResumableFetcher(tmp_path / "partial", connect_timeout=2, read_timeout=2)
    base = with_credentials(ota_env.server.url)
    ota_env.server.fail("missing.json", 404)
    ota_env.server.override("endless.bin", lambda: iter([b"x" * 4096] * 1000))
    failures: list[BaseException] = []
    for call in (
        lambda: fetcher.download_bytes(base + "metadata/missing.json?password=s3cret", 1000),
        lambda: fetcher.download_bytes(base + "targets/endless.bin?password=s3cret", 1000),
        lambda: fetcher.download_bytes(f"http://admin:hunter2@127.0.0.1:{closed_port()}/x.json?password=s3cret", 10),
    ):
        with pytest.raises(exceptions.DownloadError) as info:
            call()
        failures.append(info.value)
    reasons = [rejection(e) for e in failures]
    assert [r.reason for r in reasons] == ["network", "too_large", "network"]
    assert "127.0.0.1" in str(failures[0]) and "admin:***@" in str(failures[0])
    log = logging.getLogger("edge.ota.updater")
    for r in reasons:  # as the updater reports a rollback
        event(log, logging.WARNING, "update rolled back", reason=r.reason, detail=r.detail)
    assert_clean(*(str(e) for e in failures), *(str(r) for r in reasons), captured.getvalue())
    assert captured.getvalue().count("update rolled back") == 3


def test_a_failed_refresh_through_a_url_with_credentials_says_nothing_of_them(
    ota_env: OtaEnv, captured: io.StringIO
) -> None:
    ota_env.server.fail("timestamp.json", 500)
    client = TrustClient(
        repo_url=with_credentials(ota_env.server.url),
        metadata_dir=ota_env.box / "tuf",
        downloads_dir=ota_env.box / "downloads",
        trusted_root=ota_env.repo.root_bytes(),
        time_floor=TimeFloor(ota_env.box / "time-floor.json"),
        clock=lambda: ota_env.clock,
        fetcher=ResumableFetcher(ota_env.box / "partial", connect_timeout=2, read_timeout=2),
    )
    with pytest.raises(UpdateRejected) as info:
        client.refresh()
    assert info.value.reason == "network" and "timestamp.json" in info.value.detail
    event(
        logging.getLogger("edge.ota.updater"), logging.WARNING, "OTA metadata refresh failed", detail=info.value.detail
    )
    assert_clean(str(info.value), info.value.detail, captured.getvalue())


def test_a_rejection_never_carries_credentials() -> None:
    """ngclient's messages quote the URL they failed on; the verdict (logged, and sent as a signed OTA event) masks
    its credentials."""
    error = exceptions.RepositoryError("bad metadata at https://ota:hunter2@repo.example/1.root.json?token=s3cret")
    verdict = rejection(error)
    assert verdict.reason == "bad_metadata" and "repo.example" in verdict.detail
    assert_clean(verdict.detail, str(verdict))
