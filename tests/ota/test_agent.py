"""The updater inside the service (edge.ota.agent): fleet requests queued and answered at once, run one at a time on
the agent's thread against a real repository, TUF client, health gate and slots; repeated and unknown requests
answered the way a rollout expects."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from box_helpers import Recorder, make_updater, utc_now
from repo_helpers import ready_repository
from static_server import StaticServer

from edge.ota.agent import MAX_QUEUED, OtaAgent
from edge.ota.clock import TimeFloor


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StaticServer, bytes]]:
    repo, _key = ready_repository(tmp_path_factory.mktemp("fleet"), now=utc_now(), versions=("1.0.0", "2.0.0"))
    with StaticServer(repo.repository_dir) as server:
        yield server, repo.root_bytes()


def started(tmp_path: Path, served: tuple[StaticServer, bytes]) -> tuple[OtaAgent, Recorder]:
    server, root = served
    up, rec = make_updater(tmp_path, server.url, root)
    agent = OtaAgent(up, check_interval_s=3600, time_floor=TimeFloor(tmp_path / "ota" / "time-floor.json"))
    agent.start()
    return agent, rec


def wait_outcomes(agent: OtaAgent, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(agent.outcomes) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(agent.outcomes) >= n, agent.outcomes


def test_update_then_fleet_rollback_then_already_active(tmp_path: Path, served) -> None:
    agent, rec = started(tmp_path, served)
    try:
        assert agent.request_update("digits", "2.0.0", False, "r1") == {"accepted": True, "queued": 1}
        wait_outcomes(agent, 1)
        assert agent.outcomes[-1].state == "committed"
        assert agent.updater.status()["active"]["model"] == "digits@2.0.0"

        # Asked again (a repeated rollout, a box that missed its reply): success, reported as committed.
        before = len(rec.events)
        agent.request_update("digits", "2.0.0", False, "r2")
        wait_outcomes(agent, 2)
        assert (agent.outcomes[-1].state, agent.outcomes[-1].reason) == ("unchanged", "already_active")
        kind, data = rec.events[before]
        assert kind == "ota.committed" and data["reason"] == "already_active" and data["rollout"] == "r2"

        # A rollback of a version that is not active changes nothing.
        agent.request_rollback("digits", "9.0.0", "r3")
        wait_outcomes(agent, 3)
        assert (agent.outcomes[-1].state, agent.outcomes[-1].reason) == ("unchanged", "not_active")

        # The fleet's rollback of the active version: back to the factory model, 2.0.0 never retried unless forced.
        agent.request_rollback("digits", "2.0.0", "r4")
        wait_outcomes(agent, 4)
        assert agent.outcomes[-1].state == "rolled_back"
        assert "ota.reverted" in [k for k, _ in rec.events]
        status = agent.updater.status()
        assert status["active"]["model"] == "digits@1.0.0" and "digits@2.0.0" in status["failed"]
        agent.request_update("digits", "2.0.0", False, "r5")
        wait_outcomes(agent, 5)
        assert (agent.outcomes[-1].state, agent.outcomes[-1].reason) == ("refused", "failed_before")
    finally:
        agent.stop()


def test_requests_are_bounded_and_deduplicated(tmp_path: Path, served) -> None:
    server, root = served
    up, _rec = make_updater(tmp_path, server.url, root)
    agent = OtaAgent(up, check_interval_s=3600)  # not started: requests stay queued
    first = agent.request_update("digits", "2.0.0", False, "r1")
    assert first == {"accepted": True, "queued": 1}
    assert agent.request_update("digits", "2.0.0", False, "r1")["duplicate"] is True
    for i in range(MAX_QUEUED - 1):
        assert agent.request_update("digits", f"3.0.{i}", False, None)["accepted"] is True
    assert agent.request_update("digits", "4.0.0", False, None) == {
        "accepted": False,
        "reason": "busy",
        "queued": MAX_QUEUED,
    }


def test_verified_command_times_raise_the_time_floor(tmp_path: Path, served) -> None:
    server, root = served
    up, _rec = make_updater(tmp_path, server.url, root)
    floor = TimeFloor(tmp_path / "floor.json")
    agent = OtaAgent(up, check_interval_s=3600, time_floor=floor)
    agent.prove_time(2_000_000_000.0, clock=2_000_000_000.0)
    agent.prove_time(1_000_000_000.0, clock=2_000_000_000.0)  # never lowered
    assert TimeFloor(tmp_path / "floor.json").floor() == 2_000_000_000.0
    agent.prove_time(2_100_000_000.0)  # far past the box's clock (now): believed only up to an hour past it
    assert TimeFloor(tmp_path / "floor.json").floor() == 2_000_000_000.0
