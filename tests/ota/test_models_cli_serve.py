"""``edge fleet models serve`` and ``edge fleet publishers allow`` through the real command line.

The server is a real ``edge fleet models serve`` process; the box that updates from it is a real ``edge ota update``
process (the box's TUF client and resumable fetcher). The server must serve the repository's files and nothing else.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from box_helpers import utc_now
from repo_helpers import ready_repository

from edge.fleet.models.repository import FleetRepository

ROOT = Path(__file__).resolve().parents[2]


def _edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("edge: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    """A fleet directory whose repository holds digits 1.0.0 and 2.0.0, signed now, publisher acme."""
    d = tmp_path / "fleet"
    ready_repository(d, now=utc_now(), versions=("1.0.0", "2.0.0"))
    return d


@pytest.fixture
def served(fleet: Path) -> Iterator[str]:
    """A running ``edge fleet models serve`` on a free loopback port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "fleet", "--dir", str(fleet), "models", "serve", "--listen", "127.0.0.1:0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        pytest.fail(f"serve did not start: {line!r} {proc.communicate()[1][-2000:]}")
    url = line.split(" at ", 1)[1].split()[0]
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err


def _get(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)  # the path exactly as given: no normalising
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_box_updates_from_the_served_repository(tmp_path: Path, fleet: Path, served: str) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(FleetRepository.load(fleet).root_bytes())
    box = tmp_path / "box"
    run = _edge("ota", "update", "digits", "2.0.0", "--data-dir", str(box), "--repo-url", served, "--root", str(root))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("committed: digits@2.0.0"), run.stdout
    st = _edge("ota", "status", "--data-dir", str(box), "--json")
    assert json.loads(st.stdout)["active"]["model"] == "digits@2.0.0"


def test_serves_only_the_repository_files(fleet: Path, served: str) -> None:
    repo = fleet / "repository"
    status, body = _get(served, "/metadata/timestamp.json")
    assert status == 200 and body == (repo / "metadata" / "timestamp.json").read_bytes()
    status, body = _get(served, "/metadata/timestamp.json", headers={"Range": "bytes=10-"})
    assert status == 206 and body == (repo / "metadata" / "timestamp.json").read_bytes()[10:]
    assert _get(served, "/metadata/timestamp.json", "HEAD")[0] == 200
    # The fleet's private keys sit beside the repository: no path may reach them.
    keyfile = next((fleet / "tuf" / "keys" / "timestamp").glob("*.pem"))
    (repo / "escape").symlink_to(fleet / "tuf")
    for path in (
        "/", "/metadata/", "/targets", "/../tuf/keys/timestamp/" + keyfile.name,
        "/%2e%2e/tuf/keys/timestamp/" + keyfile.name, "/escape/keys/timestamp/" + keyfile.name,
        "//etc/passwd", "/metadata/%00timestamp.json", "/nothing.json",
    ):  # fmt: skip
        status, body = _get(served, path)
        assert status == 404, (path, status)
        assert b"PRIVATE KEY" not in body and b"timestamp.json" not in body, path
    assert _get(served, "/metadata/timestamp.json", "POST")[0] == 501
    assert _get(served, "/metadata/timestamp.json", "PUT")[0] == 501


def test_a_port_in_use_is_one_line_naming_the_address(fleet: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = _edge("fleet", "--dir", str(fleet), "models", "serve", "--listen", f"127.0.0.1:{port}", timeout=30)
    assert run.returncode == 1, run.stderr
    line = _one_error_line(run)
    assert f"127.0.0.1:{port}" in line and "in use" in line, line
    bad = _edge("fleet", "--dir", str(fleet), "models", "serve", "--listen", "8080", timeout=30)
    assert bad.returncode == 2 and "--listen" in _one_error_line(bad)
    missing = _edge("fleet", "--dir", str(fleet.parent / "nofleet"), "models", "serve", timeout=30)
    assert missing.returncode != 0 and "edge fleet models init" in _one_error_line(missing)


def test_publishers_allow_adds_removes_and_replaces(fleet: Path) -> None:
    def allow(spec: str) -> subprocess.CompletedProcess[str]:
        return _edge("fleet", "--dir", str(fleet), "publishers", "allow", "acme", f"--models={spec}", timeout=60)

    def models() -> list[str]:
        return FleetRepository.load(fleet).publisher_models("acme")

    version = FleetRepository.load(fleet).metadata("targets").signed.version
    run = allow("+mobilenet,+letters")
    assert run.returncode == 0, run.stderr
    assert models() == ["digits", "letters", "mobilenet"]  # added, not replaced
    assert FleetRepository.load(fleet).metadata("targets").signed.version == version + 1
    assert [m.model_id for m in FleetRepository.load(fleet).releases()] == ["digits@1.0.0", "digits@2.0.0"]

    run = allow("-letters")
    assert run.returncode == 0, run.stderr
    assert models() == ["digits", "mobilenet"] and "letters" in run.stderr  # the warning names what boxes drop

    run = allow("+mobilenet")
    assert run.returncode == 0 and "(unchanged)" in run.stdout
    assert FleetRepository.load(fleet).metadata("targets").signed.version == version + 2  # nothing re-signed

    run = allow("digits")
    assert run.returncode == 0, run.stderr
    assert models() == ["digits"]

    mixed = allow("+x,y")
    assert mixed.returncode == 2 and "--models" in _one_error_line(mixed)
    empty = allow("-digits")
    assert empty.returncode != 0 and "no model" in _one_error_line(empty)
    unknown = _edge("fleet", "--dir", str(fleet), "publishers", "allow", "nobody", "--models", "+x", timeout=60)
    assert unknown.returncode != 0 and "nobody" in _one_error_line(unknown)
    assert models() == ["digits"]
