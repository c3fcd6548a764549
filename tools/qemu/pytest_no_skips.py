"""pytest plugin of the emulated tier (``-p pytest_no_skips``): any skipped test or module fails the run.

Every file in tools/qemu/tests.txt was chosen to run whole under emulation, so a skip there means something is
missing from the aarch64 environment (a module-level ``importorskip`` for a wheel that did not install skips a whole
file and pytest would still exit 0). Invariant: the run passes only if every collected test ran and passed.
"""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Turn a successful run with skips into a failed one.

    Args:
        session: the pytest session.
        exitstatus: the status pytest would exit with.
    """
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        where = sorted({getattr(r, "nodeid", "?") or getattr(r, "fspath", "?") for r in skipped})
        print(f"\npytest_no_skips: {len(skipped)} skipped under emulation (each listed file must run whole): {where}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
