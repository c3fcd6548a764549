"""Log levels as journald priorities: under systemd, with the log stream connected to the journal, each line starts
with ``<N>`` (sd-daemon(3)), so ``journalctl -p warning`` filters; anywhere else the lines are unchanged.

systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of the stream it connects: the tests hand a real process a pipe as
its stderr and set the variable to that pipe's numbers, as systemd would, or to another stream's."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge.fleet.pki.ca import FleetCA

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from edge.log import configure, event
    configure("debug", sys.argv[1])
    log = logging.getLogger("edge.test")
    event(log, logging.DEBUG, "a debug line", n=1)
    event(log, logging.INFO, "an info line", n=2)
    event(log, logging.WARNING, "a warning line", n=3)
    event(log, logging.ERROR, "an error line", n=4)
    event(log, logging.CRITICAL, "a critical line", n=5)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    """
)


def _run(args: list[str], journal: str | None, *, stop_after: float | None = None) -> str:
    """Run ``args`` with a pipe as stderr; ``journal``: "match" (JOURNAL_STREAM names that pipe), "other" (names
    another stream), or None (unset). Returns what it wrote to stderr."""
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    st = os.fstat(w)
    if journal == "match":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal == "other":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # the journal, but stderr was redirected elsewhere
    with subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=w) as proc:
        os.close(w)
        if stop_after is not None:
            time.sleep(stop_after)
            proc.send_signal(signal.SIGTERM)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        proc.wait(30)
    return out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_each_line_carries_its_priority_when_stderr_is_the_journal(fmt: str) -> None:
    out = _run([sys.executable, "-c", _SCRIPT, fmt], "match")
    lines = out.splitlines()
    want = {"a debug line": "<7>", "an info line": "<6>", "a warning line": "<4>", "an error line": "<3>"}
    want["a critical line"] = "<2>"
    for message, prefix in want.items():
        (line,) = [x for x in lines if message in x]
        assert line.startswith(prefix), line
        if fmt == "json":
            assert json.loads(line[len(prefix) :])["msg"] == message  # journald strips the prefix: valid JSON
    # Every line of a traceback is a journal entry of its own: each keeps the error priority.
    assert any("ValueError: boom" in x for x in lines)
    assert all(x.startswith("<3>") for x in lines if "Traceback" in x or "boom" in x), out
    assert all(x[:3] in {"<2>", "<3>", "<4>", "<6>", "<7>"} for x in lines), out


@pytest.mark.parametrize("journal", [None, "other"])
def test_no_prefix_outside_the_journal_even_with_the_variable_inherited(journal: str | None) -> None:
    out = _run([sys.executable, "-c", _SCRIPT, "json"], journal)
    lines = out.splitlines()
    assert len(lines) == 6, out
    for line in lines:
        assert json.loads(line)["level"] in {"debug", "info", "warning", "error", "critical"}, line


def test_the_gateway_logs_with_priorities_under_systemd(tmp_path: Path) -> None:
    # `edge gateway run` as systemd starts it: the broker is not there, so it warns while it retries.
    fleet = tmp_path / "fleet"
    (tmp_path / "gateway.toml").write_text(
        textwrap.dedent(
            f"""
            [gateway]
            id = "gw-journal"
            fleet_dir = "{fleet}"
            [broker]
            host = "127.0.0.1"
            port = 1
            ca = "{fleet}/ca.pem"
            cert = "{fleet}/gw.pem"
            key = "{fleet}/gw.key"
            dynamic_security = false
            [metrics]
            enabled = false
            [rollout]
            enabled = false
            """
        )
    )
    now = datetime.datetime.now(datetime.UTC)
    ca = FleetCA.init(fleet, now=now)
    cert, key = ca.issue_client("gw-journal", now=now, days=1)
    (tmp_path / "fleet" / "gw.pem").write_bytes(cert)
    (tmp_path / "fleet" / "gw.key").write_bytes(key)
    os.chmod(tmp_path / "fleet" / "gw.key", 0o600)
    (tmp_path / "fleet" / "ca.pem").write_bytes(ca.cert_path.read_bytes())
    args = [sys.executable, "-m", "edge", "gateway", "run", "--config", str(tmp_path / "gateway.toml")]
    out = _run(args, "match", stop_after=4.0)
    lines = out.splitlines()
    started = [x for x in lines if '"gateway started"' in x]
    assert started and started[0].startswith("<6>{"), out
    assert any(x.startswith("<4>{") and "127.0.0.1:1" in x for x in lines), out  # the broker it cannot reach
    assert all(x[:3] in {"<3>", "<4>", "<6>", "<7>"} for x in lines), out
