"""Signed fleet commands, sans-IO: every rejection by its name, the clock policy, and the persisted nonce set."""

from __future__ import annotations

import os
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.telemetry.nonces import FileNonceStore, NonceFileError
from edge.wire.commands import (
    COMMAND_KID,
    MAX_COMMAND_BYTES,
    Command,
    CommandBadSignature,
    CommandExpired,
    CommandMalformed,
    CommandRejected,
    CommandReplayed,
    CommandsUnavailable,
    CommandTooLong,
    CommandUnsigned,
    CommandVerifier,
    CommandWrongDevice,
    InvalidCommandError,
    NonceSet,
    NonceStoreFull,
    UnknownCommand,
    sign_command,
)
from edge.wire.cose import ALG_EDDSA, HEADER_ALG, HEADER_KID, sign1

DEVICE = "cam-1"
T0 = 1_800_000_000.0


@pytest.fixture
def fleet_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def verifier(key: Ed25519PrivateKey, **kw) -> CommandVerifier:
    kw.setdefault("seen", NonceSet())
    return CommandVerifier(key.public_key(), DEVICE, **kw)


def rejected(v: CommandVerifier, data: bytes, now: float = T0) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        v.verify(data, now)
    return info.value


def raw_command(key: Ed25519PrivateKey, payload: dict, *, protected: dict | None = None, unprotected=None) -> bytes:
    prot = protected if protected is not None else {HEADER_ALG: ALG_EDDSA, HEADER_KID: COMMAND_KID}
    return sign1(cbor2.dumps(payload, canonical=True), key, protected=prot, unprotected=unprotected or {})


def payload(**over) -> dict:
    p = {1: 1, 2: DEVICE, 3: "ping", 4: {}, 5: b"\x01" * 16, 6: T0, 7: T0 + 60}
    for k, v in over.items():
        p[int(k[1:])] = v
    return p


def test_signed_command_verifies_and_round_trips(fleet_key) -> None:
    data = sign_command(fleet_key, DEVICE, "set", {"key": "log.level", "value": "debug"}, now=T0, ttl_s=30)
    cmd = verifier(fleet_key).verify(data, T0 + 1)
    assert cmd == Command(DEVICE, "set", {"key": "log.level", "value": "debug"}, cmd.nonce, T0, T0 + 30)
    assert len(cmd.nonce) == 16
    # Two signings never share a nonce: each is a distinct, single-use command.
    assert sign_command(fleet_key, DEVICE, "ping", {}, now=T0) != sign_command(fleet_key, DEVICE, "ping", {}, now=T0)


def test_forged_signature_rejected(fleet_key) -> None:
    attacker = Ed25519PrivateKey.generate()
    e = rejected(verifier(fleet_key), sign_command(attacker, DEVICE, "ping", {}, now=T0))
    assert isinstance(e, CommandBadSignature) and e.reason == "bad_signature" and e.command is None


def test_tampered_payload_rejected(fleet_key) -> None:
    data = bytearray(sign_command(fleet_key, DEVICE, "set", {"key": "log.level", "value": "info"}, now=T0))
    i = data.index(b"info")
    data[i : i + 4] = b"warn"  # same length: the structure stays valid, only the signature can tell
    assert rejected(verifier(fleet_key), bytes(data)).reason == "bad_signature"


def test_unsigned_commands_rejected(fleet_key) -> None:
    v = verifier(fleet_key)
    assert isinstance(rejected(v, b""), CommandUnsigned)
    good = cbor2.loads(sign_command(fleet_key, DEVICE, "ping", {}, now=T0))
    for sig in (b"", None):
        stripped = cbor2.dumps(cbor2.CBORTag(18, [good.value[0], {}, good.value[2], sig]))
        e = rejected(v, stripped)
        assert e.reason == "unsigned", (sig, e)


def test_wrong_device_rejected(fleet_key) -> None:
    e = rejected(verifier(fleet_key), sign_command(fleet_key, "cam-2", "ping", {}, now=T0))
    assert isinstance(e, CommandWrongDevice) and e.reason == "wrong_device"
    assert e.command is not None and e.command.device_id == "cam-2"  # authenticated: the reply may name it


def test_expired_command_rejected(fleet_key) -> None:
    data = sign_command(fleet_key, DEVICE, "ping", {}, now=T0, ttl_s=60)
    v = verifier(fleet_key)
    assert isinstance(rejected(v, data, now=T0 + 60.5), CommandExpired)
    assert v.verify(data, T0 + 59.5).name == "ping"  # just inside its lifetime


def test_too_long_lifetime_rejected(fleet_key) -> None:
    data = sign_command(fleet_key, DEVICE, "ping", {}, now=T0, ttl_s=7200)
    e = rejected(verifier(fleet_key, max_ttl_s=3600), data)
    assert isinstance(e, CommandTooLong) and e.reason == "too_long"
    assert verifier(fleet_key, max_ttl_s=7200).verify(data, T0).name == "ping"


def test_replayed_command_rejected(fleet_key) -> None:
    v = verifier(fleet_key)
    data = sign_command(fleet_key, DEVICE, "ping", {}, now=T0)
    v.verify(data, T0)
    e = rejected(v, data, now=T0 + 1)
    assert isinstance(e, CommandReplayed) and e.reason == "replayed" and e.command is not None


def test_replay_under_new_signature_bytes_rejected(fleet_key) -> None:
    # Same nonce, re-signed (e.g. a gateway bug resending): the nonce, not the bytes, makes a command single-use.
    nonce = os.urandom(16)
    v = verifier(fleet_key)
    v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0, nonce=nonce), T0)
    again = sign_command(fleet_key, DEVICE, "status", {}, now=T0 + 1, nonce=nonce)
    assert rejected(v, again, now=T0 + 1).reason == "replayed"


def test_unknown_command_rejected_when_verifier_has_an_allowed_set(fleet_key) -> None:
    v = verifier(fleet_key, allowed={"ping"})
    e = rejected(v, sign_command(fleet_key, DEVICE, "reboot", {}, now=T0))
    assert isinstance(e, UnknownCommand) and e.reason == "unknown_command"


def test_oversize_command_rejected_before_decoding(fleet_key) -> None:
    # Not even CBOR: an oversized blob is refused on its length alone.
    e = rejected(verifier(fleet_key), b"\xff" * (MAX_COMMAND_BYTES + 1))
    assert e.reason == "malformed" and "exceeds" in str(e)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        b'{"name": "ping"}',
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"x"])),
        cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"x", b"\x00" * 64])),
    ],
    ids=["garbage", "json", "array", "three-parts", "wrong-tag"],
)
def test_malformed_input_rejected(fleet_key, data) -> None:
    e = rejected(verifier(fleet_key), data)
    assert isinstance(e, CommandMalformed) and e.reason == "malformed"


@pytest.mark.parametrize(
    ("what", "p"),
    [
        ("missing-nonce", {k: v for k, v in payload().items() if k != 5}),
        ("extra-key", {**payload(), 8: 1}),
        ("short-nonce", payload(k5=b"\x01" * 8)),
        ("bad-version", payload(k1=2)),
        ("bad-device", payload(k2="../etc")),
        ("bad-name", payload(k3="Ping!")),
        ("nested-arg", payload(k4={"a": [1, 2]})),
        ("nan-time", payload(k6=float("nan"))),
        ("expiry-before-issue", payload(k6=T0, k7=T0 - 1)),
        ("args-not-map", payload(k4=[1])),
    ],
)
def test_signed_but_malformed_payload_rejected(fleet_key, what, p) -> None:
    e = rejected(verifier(fleet_key), raw_command(fleet_key, p))
    assert e.reason == "malformed", (what, e)


def test_wrong_kid_or_unprotected_header_rejected(fleet_key) -> None:
    v = verifier(fleet_key)
    other_kid = raw_command(fleet_key, payload(), protected={HEADER_ALG: ALG_EDDSA, HEADER_KID: b"cam-1"})
    assert rejected(v, other_kid).reason == "malformed"
    smuggled = raw_command(fleet_key, payload(), unprotected={99: "not signed"})
    assert rejected(v, smuggled).reason == "malformed"


def test_command_issued_in_the_box_future_is_accepted(fleet_key) -> None:
    # A box without RTC boots in 1970: a fresh command is "from the future" but not expired by the box's clock.
    cmd = verifier(fleet_key).verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0), now=0.0)
    assert cmd.issued_at == T0


def test_replay_after_clock_reset_rejected_by_fleet_time(fleet_key, tmp_path) -> None:
    # The box accepted A, then B (issued after A expired, so A's nonce was forgotten), then rebooted with its clock
    # in 1970. Replaying A must still fail: the persisted floor (B's issued-at) says A expired.
    path = tmp_path / "nonces.cbor"
    a = sign_command(fleet_key, DEVICE, "ping", {}, now=T0, ttl_s=60)
    b = sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + 600, ttl_s=60)
    v = verifier(fleet_key, seen=FileNonceStore(path))
    v.verify(a, T0)
    v.verify(b, T0 + 600)
    assert len(v.seen) == 1  # A's nonce is gone
    rebooted = verifier(fleet_key, seen=FileNonceStore(path))
    e = rejected(rebooted, a, now=0.0)
    assert isinstance(e, CommandExpired) and "fleet time" in str(e)


def test_nonce_store_survives_reopen(fleet_key, tmp_path) -> None:
    path = tmp_path / "nonces.cbor"
    data = sign_command(fleet_key, DEVICE, "ping", {}, now=T0)
    verifier(fleet_key, seen=FileNonceStore(path)).verify(data, T0)
    assert path.stat().st_mode & 0o777 == 0o600
    e = rejected(verifier(fleet_key, seen=FileNonceStore(path)), data, now=T0 + 1)
    assert e.reason == "replayed"


def test_nonce_store_full_refuses_rather_than_forgets(fleet_key) -> None:
    seen = NonceSet(capacity=3)
    v = verifier(fleet_key, seen=seen)
    sent = [sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + i, ttl_s=600) for i in range(4)]
    for data in sent[:3]:
        v.verify(data, T0)
    e = rejected(v, sent[3])
    assert isinstance(e, NonceStoreFull) and e.reason == "nonce_store_full"
    assert e.command is not None
    for data in sent[:3]:  # none of the held nonces was dropped to make room
        assert rejected(v, data).reason == "replayed"
    # Once fleet time passes the held nonces' expiry, they are forgotten and new commands fit again.
    later = sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + 1000, ttl_s=60)
    assert v.verify(later, T0 + 1000).name == "ping"
    assert len(seen) == 1


def test_rejected_command_is_not_remembered(fleet_key) -> None:
    # An expired command's nonce must not take room (nor be "seen"): only accepted commands are recorded.
    seen = NonceSet()
    v = verifier(fleet_key, seen=seen)
    rejected(v, sign_command(fleet_key, DEVICE, "ping", {}, now=T0, ttl_s=1), now=T0 + 5)
    assert len(seen) == 0 and seen.floor() == 0.0


def test_corrupt_nonce_file_refused_not_reset(tmp_path) -> None:
    path = tmp_path / "nonces.cbor"
    path.write_bytes(b"\xa3garbage")
    with pytest.raises(NonceFileError):
        FileNonceStore(path)


def test_unwritable_nonce_file_refuses_the_command(fleet_key, tmp_path) -> None:
    missing_dir = tmp_path / "gone" / "nonces.cbor"  # its directory does not exist: the write fails
    v = verifier(fleet_key, seen=FileNonceStore(missing_dir))
    e = rejected(v, sign_command(fleet_key, DEVICE, "ping", {}, now=T0))
    assert isinstance(e, CommandsUnavailable) and e.reason == "unavailable"


def test_nonce_set_encoding_round_trips() -> None:
    s = NonceSet(capacity=10)
    s.remember(b"\x02" * 16, issued_at=T0, expires_at=T0 + 5)
    s.remember(b"\x01" * 16, issued_at=T0 + 1, expires_at=T0 + 9)
    back = NonceSet.decode(s.encode(), capacity=10)
    assert back.floor() == T0 + 1 and len(back) == 2 and b"\x01" * 16 in back
    assert back.encode() == s.encode()


@pytest.mark.parametrize(
    ("args", "kw"),
    [
        ({"k": [1]}, {}),
        ({"k": float("inf")}, {}),
        ({"bad key!": 1}, {}),
        ({}, {"ttl_s": 0}),
        ({}, {"nonce": b"short"}),
        ({"k": "x" * 300}, {}),
    ],
)
def test_sign_command_refuses_invalid_input(fleet_key, args, kw) -> None:
    with pytest.raises(InvalidCommandError):
        sign_command(fleet_key, DEVICE, "set", args, now=T0, **kw)
    with pytest.raises(InvalidCommandError):
        sign_command(fleet_key, "no/slash", "ping", {}, now=T0)


# -- time floors that cannot be poisoned (docs/commands.md, "Clock policy") -----------------------------------------

YEAR = 365 * 86400.0
BUILD = 1_790_000_000.0  # this test's firmware build time (a box's verifier gets edge.ota.clock.BUILD_TIME)


def box_verifier(key: Ed25519PrivateKey, **kw) -> CommandVerifier:
    kw.setdefault("build_time", BUILD)
    return verifier(key, **kw)


def test_far_future_command_does_not_expire_the_next_correct_command(fleet_key) -> None:
    # A fleet whose clock jumped ten years ahead (or a command key thief) signs one command. The box runs it (it
    # has not expired), but its issued-at moves the floor no further than the box's own clock.
    v = box_verifier(fleet_key)
    far = sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + 10 * YEAR)
    assert v.verify(far, T0).name == "ping"
    assert v.seen.floor() == T0
    correct = sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + 1, ttl_s=60)
    assert v.verify(correct, T0 + 2).issued_at == T0 + 1
    assert rejected(v, far, now=T0 + 3).reason == "replayed"  # its nonce is kept until true time passes it


def test_ratchet_of_commands_each_slightly_ahead_does_not_move_the_floor(fleet_key) -> None:
    # Each command 50 minutes after the last: measured from the floor, the floor would walk a day ahead.
    v = box_verifier(fleet_key)
    for i in range(1, 30):
        v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + i * 3000, ttl_s=60), T0 + i)
        assert v.seen.floor() <= T0 + i
    assert v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + 40, ttl_s=60), T0 + 40).name == "ping"


def test_rtc_less_box_command_floor_follows_only_proven_time(fleet_key) -> None:
    # The box's clock reads 1970. Alone, a command proves nothing past the build time; once the OTA floor has a time
    # two keys agreed on, the command floor may follow it (less MAX_AHEAD_S, its lower_bound).
    v = box_verifier(fleet_key)
    v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0), 1000.0)
    assert v.seen.floor() == BUILD
    v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0 + 5), 1005.0, proven=T0 - 3600)
    assert v.seen.floor() == T0 - 3600


def test_command_that_expired_before_the_firmware_was_built_is_expired(fleet_key) -> None:
    # A box in 1970 with nothing proven still knows it is no older than its firmware: an old captured command is out.
    old = sign_command(fleet_key, DEVICE, "ping", {}, now=BUILD - 600, ttl_s=60)
    e = rejected(box_verifier(fleet_key), old, now=0.0)
    assert isinstance(e, CommandExpired) and "build time" in str(e)


def poisoned_store(path: Path, floor: float) -> FileNonceStore:
    """A nonce file as the code before the horizon rule wrote it after a far-future command: version 1, the floor
    at that command's issued-at, every older nonce forgotten."""
    path.write_bytes(cbor2.dumps({1: 1, 2: floor, 3: [[b"\x09" * 16, floor + 60.0]]}, canonical=True))
    return FileNonceStore(path)


def test_nonce_file_from_before_the_rule_is_kept_as_it_is(fleet_key, tmp_path) -> None:
    # Lowering its floor on load could reopen replays of the nonces it made the box forget: it is kept, and every
    # correct command is expired until the fleet runs time/reset. The error says so.
    store = poisoned_store(tmp_path / "nonces.cbor", T0 + 10 * YEAR)
    assert store.floor() == T0 + 10 * YEAR and store.not_before() == 0.0 and len(store) == 1
    e = rejected(box_verifier(fleet_key, seen=store), sign_command(fleet_key, DEVICE, "ping", {}, now=T0), now=T0)
    assert isinstance(e, CommandExpired) and "time/reset" in str(e)


def test_time_reset_recovers_a_poisoned_box_and_no_pre_reset_command_replays(fleet_key, tmp_path) -> None:
    path = tmp_path / "nonces.cbor"
    # Before the fix: the box accepted X (an hour-long command), then a far-future command that forgot X's nonce.
    x = sign_command(fleet_key, DEVICE, "set", {"key": "log.level", "value": "debug"}, now=T0, ttl_s=3600)
    far = T0 + 10 * YEAR
    v = box_verifier(fleet_key, seen=poisoned_store(path, far))
    now = T0 + 10
    assert rejected(v, sign_command(fleet_key, DEVICE, "ping", {}, now=now), now=now).reason == "expired"
    # The fleet signs time/reset at the floor the box reports, carrying its true time.
    reset = sign_command(fleet_key, DEVICE, "time/reset", {"to": now}, now=far)
    cmd = v.verify(reset, now)
    assert v.reset_time(cmd.args["to"], now)
    assert (v.seen.floor(), v.seen.not_before()) == (now, now)
    # Back: a correct command runs, also after a reboot (the reset is in the file, as version 2).
    assert v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=now + 1), now + 1).name == "ping"
    rebooted = box_verifier(fleet_key, seen=FileNonceStore(path))
    assert rebooted.seen.not_before() == now and cbor2.loads(path.read_bytes())[1] == 2
    # X's nonce was forgotten and X has not expired: only not-before stops its replay.
    e = rejected(rebooted, x, now=now + 2)
    assert isinstance(e, CommandExpired) and "before the time reset" in str(e)
    assert rejected(rebooted, reset, now=now + 3).reason == "replayed"  # the reset itself cannot be replayed


def test_time_reset_never_raises_the_floor_nor_lowers_it_below_the_box_clock(fleet_key) -> None:
    seen = NonceSet()
    v = box_verifier(fleet_key, seen=seen)
    v.verify(sign_command(fleet_key, DEVICE, "ping", {}, now=T0), T0)
    # A command key thief resets "to" ten years ahead: nothing changes, no command is refused for it.
    assert not v.reset_time(T0 + 10 * YEAR, T0)
    assert (seen.floor(), seen.not_before()) == (T0, 0.0)
    # A fleet clock far behind resets to the build time: the floor goes no lower than the box's own clock.
    seen.remember(b"\x07" * 16, issued_at=T0 + 500, expires_at=T0 + 560)
    assert v.reset_time(BUILD, T0 + 100)
    assert seen.floor() == T0 + 100 == seen.not_before()


def test_nonce_set_of_version_2_round_trips_and_is_checked() -> None:
    s = NonceSet(capacity=10, floor=T0)
    s.remember(b"\x01" * 16, issued_at=T0, expires_at=T0 + 9)
    assert cbor2.loads(s.encode())[1] == 1  # never reset: still version 1, readable by older firmware
    assert s.reset(T0 - 5)
    back = NonceSet.decode(s.encode(), capacity=10)
    assert (back.floor(), back.not_before(), len(back)) == (T0 - 5, T0 - 5, 1)
    with pytest.raises(ValueError, match="keys"):
        NonceSet.decode(cbor2.dumps({1: 2, 2: T0, 3: []}))  # version 2 without not-before
    with pytest.raises(ValueError, match="not-before"):
        NonceSet.decode(cbor2.dumps({1: 2, 2: T0, 3: [], 4: float("nan")}))


def test_worked_example_in_the_docs_is_exact() -> None:
    # docs/commands.md section 6: RFC 8032 TEST 1 key (public), fixed nonce and time; Ed25519 is deterministic.
    key = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    data = sign_command(
        key, "box-1", "set", {"key": "telemetry.batch_records", "value": 7}, now=1700000000.0, nonce=bytes(range(16))
    )
    doc = (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
    block = doc.split("## 6. Worked example", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    assert data.hex() == "".join(block.split())
    cmd = CommandVerifier(key.public_key(), "box-1", seen=NonceSet()).verify(data, 1700000001.0)
    assert (cmd.issued_at, cmd.expires_at, cmd.args) == (
        1700000000.0,
        1700000060.0,
        {"key": "telemetry.batch_records", "value": 7},
    )
