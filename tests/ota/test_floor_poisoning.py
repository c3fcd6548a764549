"""Time floors that cannot be poisoned, against the real TUF client and a served fleet repository: a timestamp signed
far in the future (a stolen timestamp key, a fleet clock that jumped) does not make the fleet's later metadata look
expired; an RTC-less box learns the time only when a timestamp and a fleet command agree; time/reset recovers a
floor poisoned before the rule."""

from __future__ import annotations

import datetime
import json

import pytest
from ota_env import OtaEnv
from repo_helpers import NOW

from edge.ota.clock import BUILD_TIME, MAX_AHEAD_S, TimeFloor
from edge.ota.errors import UpdateRejected

YEARS_10 = datetime.timedelta(days=3650)


def test_far_future_timestamp_does_not_make_later_metadata_look_expired(ota_env: OtaEnv) -> None:
    floor = TimeFloor(ota_env.box / "time-floor.json")
    ota_env.client(floor=floor).refresh()
    assert floor.floor() == NOW.timestamp()
    # A thief of the online timestamp key signs a timestamp issued ten years ahead (and valid until then).
    ota_env.commit(now=NOW + YEARS_10)
    ota_env.client(floor=floor).refresh()
    assert floor.floor() == ota_env.clock + MAX_AHEAD_S  # believed up to the horizon, not ten years
    # The fleet's next genuine timestamp, valid for a day from now: it verifies, and so does a release.
    ota_env.commit(now=NOW)
    client = ota_env.client(floor=floor)
    client.refresh()
    assert client.release("digits", "1.0.0").version == "1.0.0"


def test_rtc_less_box_learns_the_time_from_a_timestamp_and_a_command_that_agree(ota_env: OtaEnv) -> None:
    # The box woke up in 1970 (no RTC, no NTP yet): its clock is before its own build time.
    ota_env.clock = 1000.0
    floor = TimeFloor(ota_env.box / "time-floor.json")
    ota_env.client(floor=floor).refresh()  # verified at the build time: the metadata is valid then
    assert floor.floor() == BUILD_TIME + MAX_AHEAD_S  # the timestamp alone: no further than the horizon
    # A fleet command (another key) issued ten minutes after the timestamp, received 20 s of uptime later.
    assert floor.prove(NOW.timestamp() + 600, "command", kind="command", clock=1020.0)
    assert floor.floor() == NOW.timestamp()  # the smaller of the two
    assert ota_env.client(floor=floor).effective_time() == NOW.timestamp()


def test_floor_poisoned_before_the_rule_is_recovered_by_time_reset(ota_env: OtaEnv) -> None:
    # Written by the code before this rule after one far-future command: every timestamp looks expired.
    path = ota_env.box / "time-floor.json"
    path.write_text(json.dumps({"floor": (NOW + YEARS_10).timestamp(), "source": "command"}))
    floor = TimeFloor(path)
    assert floor.ahead(ota_env.clock)
    with pytest.raises(UpdateRejected) as ei:
        ota_env.client(floor=floor).refresh()
    assert ei.value.reason == "expired"
    # The fleet's time/reset (its true time: the box's clock here is right) brings it back.
    assert floor.reset(ota_env.clock, clock=ota_env.clock)
    ota_env.client(floor=floor).refresh()
    assert not floor.ahead(ota_env.clock)
