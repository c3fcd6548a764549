"""kill -9 at random moments: no committed envelope is lost unannounced, no counter is reused, the chain holds.

A subprocess (``tests/outbox_writer.py``) seals and acks in a loop and reports every commit on stdout after it
happened; the test kills it with SIGKILL at a random moment, reopens the outbox and checks it against everything
reported so far, across all runs. Set OUTBOX_CRASH_SEED to replay a sequence of kill times.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from edge.telemetry.outbox import Outbox
from edge.wire.envelope import GENESIS_PREV, envelope_hash, open_envelope
from edge.wire.schema import LossNotice, TelemetryLimits

ROOT = Path(__file__).resolve().parent.parent
WRITER = Path(__file__).resolve().parent / "outbox_writer.py"
DEVICE_ID = "crash-box"  # as in outbox_writer.py
MAX_ENVELOPES = 30
RUNS = 24
LIMITS = TelemetryLimits()


class Reported:
    """Everything the writer said it committed, over all runs."""

    def __init__(self) -> None:
        self.sealed: dict[int, str] = {}  # counter -> hash hex
        self.ack_attempted: set[int] = set()
        self.acked: set[int] = set()
        self.notices: list[tuple[int, int]] = []  # loss ranges in envelopes reported sealed or being acked

    def read(self, output: str, seed: int) -> None:
        # A line without its newline was cut by the kill: the step it reports may or may not have committed.
        for line in output.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            kind, *fields = line.split()
            if kind == "sealed":
                counter, digest = int(fields[0]), fields[1]
                assert self.sealed.setdefault(counter, digest) == digest, f"seed {seed}: counter {counter} reused"
                if len(fields) == 4:
                    self.notices.append((int(fields[2]), int(fields[3])))
            elif kind == "acking":
                for tag in fields:
                    counter, _, span = tag.partition(":")
                    self.ack_attempted.add(int(counter))
                    if span:
                        first, last = span.split("-")
                        self.notices.append((int(first), int(last)))
            elif kind == "acked":
                self.acked.update(map(int, fields))


def check(path: Path, key: Ed25519PrivateKey, reported: Reported, seen: dict[int, bytes], seed: int) -> int:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Outbox(path, device_id=DEVICE_ID, key=key, limits=LIMITS, max_envelopes=MAX_ENVELOPES) as ob:
        rows = dict(ob.pending(limit=10**6))
        stats = ob.stats()
    with sqlite3.connect(path) as db:
        (last_hash,) = db.execute("SELECT last_hash FROM head").fetchone()
    assert stats.corrupt_rows == 0, f"seed {seed}"
    assert stats.backlog_envelopes == len(rows) <= MAX_ENVELOPES
    envs = {c: open_envelope(data, key.public_key(), LIMITS) for c, data in rows.items()}
    # No counter ever has two different envelopes, within or across runs.
    for c, data in rows.items():
        assert seen.setdefault(c, data) == data, f"seed {seed}: counter {c} changed its bytes"
        assert envs[c].counter == c
        if c in reported.sealed:
            assert reported.sealed[c] == envelope_hash(data).hex(), f"seed {seed}: counter {c} is not what was reported"
    # The head is past everything ever reported, and names the last envelope sealed.
    if reported.sealed:
        assert stats.next_counter > max(reported.sealed), f"seed {seed}: head behind a reported counter"
    last = stats.next_counter - 1
    if last in seen:
        assert last_hash == envelope_hash(seen[last])
    # The chain of everything seen (still here or seen in an earlier check).
    for c, data in seen.items():
        prev = open_envelope(data, key.public_key(), LIMITS).prev
        if c == 1:
            assert prev == GENESIS_PREV
        elif c - 1 in seen:
            assert prev == envelope_hash(seen[c - 1]), f"seed {seed}: chain broken at {c}"
    # Every reported commit is still here, or the writer was acking it, or a loss notice announces its drop.
    notices = list(reported.notices)
    for env in envs.values():
        first = env.records[0] if env.records else None
        if isinstance(first, LossNotice):
            notices.append((first.first_counter, first.last_counter))
    for c in reported.sealed:
        assert c in rows or c in reported.ack_attempted or any(lo <= c <= hi for lo, hi in notices), (
            f"seed {seed}: counter {c} reported committed, now gone unannounced"
        )
    for c in reported.acked:
        assert c not in rows, f"seed {seed}: counter {c} acked, still pending"
    return stats.dropped_envelopes


def test_kill_9_at_random_moments_keeps_counters_chain_and_backlog(tmp_path: Path) -> None:
    seed = int(os.environ.get("OUTBOX_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    key = Ed25519PrivateKey.generate()
    keyfile = tmp_path / "device.raw"
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    path = tmp_path / "outbox.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    reported, seen = Reported(), dict[int, bytes]()
    dropped = 0
    for _ in range(RUNS):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), str(keyfile)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            ready = proc.stdout.readline()
            assert ready == "ready\n", f"writer did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
            time.sleep(rng.uniform(0.02, 0.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            output = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: writer exited by itself: {proc.returncode}"
        reported.read(output, seed)
        dropped = check(path, key, reported, seen, seed)
    assert len(reported.sealed) > RUNS, f"seed {seed}: the writer hardly sealed anything"
    assert reported.acked, f"seed {seed}: the writer never acked"
    assert dropped > 0, f"seed {seed}: the bound never dropped: the loss path was not exercised"
