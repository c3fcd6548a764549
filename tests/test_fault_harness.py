"""The fault harness's CI mode (``tools/faults.py``): real boxes, mosquitto, two gateways, SQLite and PostgreSQL.

At least 50 faults in all (a run per store: the fleet's gateways share one store), then the checker: no receipted
envelope lost, none credited twice, every sealed counter stored. Then the one case where loss is allowed (a box whose
outbox is filled on purpose), which must be announced by signed loss notices and counted; and the checker itself is
shown to fail on a store with a planted loss and a planted double credit, so a green run means something.

The long mode (1,000 faults and more) is the same harness from the command line: see the docstring of tools/faults.py.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import faults  # noqa: E402

pytestmark = pytest.mark.slow

SQLITE_FAULTS = 28
POSTGRES_FAULTS = 25


def explain(result: faults.RunResult) -> str:
    return faults.report(result) + f"\nfiles: {result.work}"


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory) -> tuple[faults.RunResult, Path]:
    work = tmp_path_factory.mktemp("faults-sqlite")
    opts = faults.Options(faults=SQLITE_FAULTS, store="sqlite", boxes=3, seed=11, log=lambda _s: None)
    return faults.run(opts, keep=work), work


def assert_clean(result: faults.RunResult) -> None:
    assert result.ok, explain(result)
    for box in result.check.boxes:
        assert box.sealed > 0 and box.stored == box.sealed == box.receipted, explain(result)
        assert not box.lost and not box.unstored and not box.notices and box.dropped == 0, explain(result)


def test_faults_on_sqlite_and_postgres_lose_nothing_and_credit_nothing_twice(sqlite_run, tmp_path) -> None:
    on_sqlite, _work = sqlite_run
    opts = faults.Options(faults=POSTGRES_FAULTS, store="postgres", boxes=3, seed=12, log=lambda _s: None)
    on_postgres = faults.run(opts, keep=tmp_path / "postgres")
    for result in (on_sqlite, on_postgres):
        print(faults.report(result))  # the figures, with pytest -s
        assert_clean(result)
    assert on_sqlite.injected + on_postgres.injected >= 50
    assert on_postgres.faults.get("pg_restart", 0) >= 1, explain(on_postgres)
    # Every kind of fault hit at least one of the runs.
    kinds = set(on_sqlite.faults) | set(on_postgres.faults)
    assert kinds >= set(faults.FAULT_KINDS), kinds


def test_a_filled_outbox_loses_only_what_its_loss_notices_announce(tmp_path) -> None:
    opts = faults.Options(faults=6, store="sqlite", boxes=2, seed=3, fill_outbox=True, log=lambda _s: None)
    result = faults.run(opts, keep=tmp_path / "fill")
    print(faults.report(result))
    assert result.ok, explain(result)
    filled, other = result.check.boxes
    assert result.faults.get("fill") == 1
    # The filled box dropped envelopes and some of them never reached the fleet: each is inside a signed notice's
    # range, the ledger counts them missing, and announces loss; nothing the box had receipted is missing.
    assert filled.dropped > 0 and filled.unstored and filled.notices, explain(result)
    assert not filled.lost, explain(result)
    assert 0 < filled.announced_lost <= filled.dropped, explain(result)
    assert filled.receipted + filled.dropped == filled.sealed, explain(result)
    assert other.dropped == 0 and not other.unstored and not other.notices, explain(result)


def copy_store(work: Path, to: Path) -> str:
    """A copy of the run's SQLite store (through SQLite's backup, so its WAL comes along)."""
    src = sqlite3.connect(work / "fleet" / "fleet.db")
    dst = sqlite3.connect(to)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{to}"


def test_the_checker_reports_a_planted_loss(sqlite_run, tmp_path) -> None:
    _result, work = sqlite_run
    url = copy_store(work, tmp_path / "planted.db")
    victim = "box-2"
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        (counter,) = db.execute(
            "SELECT counter FROM envelopes WHERE device_id = ? ORDER BY counter LIMIT 1 OFFSET 10", (victim,)
        ).fetchone()
        db.execute("DELETE FROM envelopes WHERE device_id = ? AND counter = ?", (victim, counter))
    found = faults.check(faults.boxes_in(work), url)
    assert not found.ok
    by_id = {b.device_id: b for b in found.boxes}
    assert by_id[victim].lost == [counter]
    assert any("LOST" in p and str(counter) in p for p in by_id[victim].problems)
    assert all(not b.problems for b in found.boxes if b.device_id != victim)


def test_the_checker_reports_a_planted_double_credit(sqlite_run, tmp_path) -> None:
    _result, work = sqlite_run
    url = copy_store(work, tmp_path / "planted.db")
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE ledger SET envelopes = envelopes + 1 WHERE device_id = 'box-1'")
    found = faults.check(faults.boxes_in(work), url)
    problems = {b.device_id: b.problems for b in found.boxes}
    assert any("DOUBLE CREDIT" in p for p in problems["box-1"]), problems
    assert not problems["box-2"] and not problems["box-3"]


def test_the_checker_reports_an_outbox_that_did_not_drain(sqlite_run, tmp_path) -> None:
    _result, work = sqlite_run
    boxes = faults.boxes_in(work)
    box_id, outbox = boxes[0]
    copy = tmp_path / "outbox.sqlite"
    shutil.copy(outbox, copy)
    with sqlite3.connect(copy) as db:  # one envelope back in the outbox, as if no receipt had covered it
        db.execute("UPDATE head SET backlog_envelopes = backlog_envelopes + 1 WHERE id = 0")
        db.execute("UPDATE delivery SET receipted_envelopes = receipted_envelopes - 1 WHERE id = 0")
    found = faults.check([(box_id, copy), *boxes[1:]], f"sqlite:///{work / 'fleet' / 'fleet.db'}")
    assert any("not empty" in p for p in found.boxes[0].problems), found.boxes[0].problems
