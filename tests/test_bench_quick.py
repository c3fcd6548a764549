"""Every benchmark under tools/bench/ runs in its quick mode, so that none can silently rot.

A benchmark is run by hand, rarely, and its speed targets are only as good as its code: an API it calls changes, a
service it drives starts refusing what it sends, and nobody notices until the next time someone wants a figure. Here
each ``tools/bench/*.py`` (found by glob: a new benchmark is covered without touching this file) runs with
``--quick`` as a subprocess from the repository root: the same code paths and correctness checks as the full run on a
small workload, no timing assertions. A failure or a hang is a test failure, with the tail of its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "tools" / "bench").glob("*.py"))
TIMEOUT_S = 600  # generous: a cold cache (generated models, signed workloads) on a slow, busy machine
TAIL_LINES = 40


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = (text or "").rstrip().splitlines()
    return "\n".join(lines[-TAIL_LINES:]) or "(empty)"


def test_benchmarks_found() -> None:
    assert BENCHES, "no tools/bench/*.py found"


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES, ids=[b.stem for b in BENCHES])
def test_bench_quick(bench: Path) -> None:
    # A session of its own, so that a hung benchmark is stopped with everything it started (brokers, gateways).
    proc = subprocess.Popen(
        [sys.executable, str(bench.relative_to(ROOT)), "--quick"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{bench.name} --quick did not finish within {TIMEOUT_S} s\n"
            f"--- stdout (tail) ---\n{_tail(out)}\n--- stderr (tail) ---\n{_tail(err)}"
        )
    elapsed = time.monotonic() - t0
    detail = f"--- stdout (tail) ---\n{_tail(out)}\n--- stderr (tail) ---\n{_tail(err)}"
    assert proc.returncode == 0, f"{bench.name} --quick exited with {proc.returncode} after {elapsed:.0f} s\n{detail}"
    assert out.strip(), f"{bench.name} --quick printed nothing\n{detail}"
