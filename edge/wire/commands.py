"""Signed commands from the fleet to a device: the wire format, the signer, and the device's verifier (sans-IO).

A command is a COSE_Sign1 (``edge.wire.cose``) signed with the fleet command key (kid ``b"fleet"``) over a
canonical CBOR map: device, name, args, a 16-byte random nonce, issued-at and expires-at. docs/commands.md has the
CDDL. Both sides use this module: the gateway signs (``sign_command``), the box verifies (``CommandVerifier``).

Checks, in order; the first that fails decides (each raises a ``CommandRejected`` subclass naming its ``reason``):

1. larger than ``MAX_COMMAND_BYTES`` (before any decoding)              -> ``malformed`` (memory and CPU bombs)
2. empty, or a COSE_Sign1 whose signature is empty                     -> ``unsigned``
3. not a COSE_Sign1 of our profile (alg EdDSA, kid "fleet", nothing unprotected) -> ``malformed``
4. signature over the bytes as received, before the payload is decoded -> ``bad_signature`` (forgery, tampering)
5. the payload against the schema                                      -> ``malformed`` (a signed but invalid map)
6. addressed to another device                                         -> ``wrong_device`` (A's command replayed to B)
7. expires-at - issued-at > ``max_ttl_s``                               -> ``too_long`` (a signed "forever" command)
8. expired by the box's time, or issued before the last ``time/reset`` (below) -> ``expired``
9. name not in the allowed set (when the verifier is given one)        -> ``unknown_command``
10. nonce seen before                                                  -> ``replayed``
11. the nonce set full of unexpired nonces                            -> ``nonce_store_full``

Clock policy for boxes without a real-time clock: the box may boot with a clock far behind. A command issued in the
box's "future" is therefore fine, as long as it has not expired by the box's time. Replay is stopped by the nonce
set, not by the clock, and the nonce set must never forget a nonce while the command could still be accepted:

- The box's time is ``max(now, floor, build_time)``: its clock, the nonce set's **floor** (fleet time proven by
  accepted commands, persisted with the nonces, never lowered except by ``time/reset``) and the release time of the
  code it runs (``edge.ota.clock.BUILD_TIME`` on a box). A command is expired if that time is past its expires-at.
- An accepted command's issued-at raises the floor, but only up to the box's own
  ``base = max(now, build_time, proven)`` (``proven``: the OTA time floor less ``MAX_AHEAD_S``, which two
  independent keys must agree on to pass the box's clock; ``edge.ota.clock``). A far-future command (a fleet clock
  gone wrong, a stolen command key) is still executed while unexpired, but it cannot move the floor past the box's
  own time and so cannot expire the fleet's later, correct commands. No margin beyond ``base``: commands live 60 s
  by default, so a floor even minutes ahead would expire them. The bound is measured from the box's clock, never from
  the floor, so a sequence of commands each slightly ahead cannot ratchet it.
- A nonce is forgotten only once the floor has passed its expires-at, never because of the box's clock: after a
  reboot with the clock in 1970, a forgotten nonce's command is still expired by the persisted floor. Retention
  follows from the bound: on a box with a set clock the floor tracks the clock and nonces go as their commands
  expire; on a box whose clock is unset and that has no agreeing OTA time, the floor stays at ``base`` and nonces are
  kept until the set is full (then new commands are refused, never an unexpired nonce forgotten).
- The set is bounded (``DEFAULT_NONCE_CAPACITY``); full of unexpired nonces, it refuses new commands rather than
  forget one.
- ``time/reset`` (``CommandVerifier.reset_time``) lowers a floor some wrong time pushed into the future (a file
  written before this rule, a wrong box clock, two sources that agreed on a wrong time) to the fleet's time ``to``,
  never below ``base``, and sets **not-before** to it: from then on a command issued before ``to`` is expired, so
  none of the fleet's earlier commands can run again, even one whose nonce the high floor made the box forget. What a
  reset cannot recall: a command issued *after* ``to`` (future-dated by the wrong clock) that the box accepted and
  then forgot under the high floor stays replayable until it expires (docs/commands.md).

The box's ``edge.telemetry.nonces.FileNonceStore`` persists the set atomically before a command is accepted, so a
reboot does not reopen a replay window; ``NonceSet`` here is its sans-IO core.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import InputError
from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id
from edge.wire._bounds import INT64_MAX, INT64_MIN, MAX_EPOCH
from edge.wire._cbor import DECODE_ERRORS, loads_strict
from edge.wire.cose import ALG_EDDSA, COSE_SIGN1_TAG, HEADER_ALG, HEADER_KID, decode_sign1, sign1
from edge.wire.errors import BadSignatureError, MalformedEnvelopeError

__all__ = [
    "COMMAND_KID",
    "Command",
    "CommandBadSignature",
    "CommandExpired",
    "CommandMalformed",
    "CommandRejected",
    "CommandReplayed",
    "CommandTooLong",
    "CommandUnsigned",
    "CommandVerifier",
    "CommandWrongDevice",
    "CommandsUnavailable",
    "DEFAULT_MAX_TTL_S",
    "DEFAULT_NONCE_CAPACITY",
    "InvalidCommandError",
    "MAX_COMMAND_BYTES",
    "NONCE_BYTES",
    "NONCE_ENTRY_BYTES",
    "NonceSet",
    "NonceStore",
    "NonceStoreFull",
    "Scalar",
    "UnknownCommand",
    "base_time",
    "sign_command",
]

COMMAND_KID: Final = b"fleet"
MAX_COMMAND_BYTES: Final = 4096
NONCE_BYTES: Final = 16
DEFAULT_MAX_TTL_S: Final = 3600.0
DEFAULT_NONCE_CAPACITY: Final = 10_000
MAX_ARGS: Final = 16
MAX_ARG_STR: Final = 256

# Payload map keys (docs/commands.md).
KEY_VERSION: Final = 1
KEY_DEVICE: Final = 2
KEY_NAME: Final = 3
KEY_ARGS: Final = 4
KEY_NONCE: Final = 5
KEY_ISSUED_AT: Final = 6
KEY_EXPIRES_AT: Final = 7
_PAYLOAD_KEYS: Final = frozenset(range(1, 8))
VERSION: Final = 1

_NAME = re.compile(r"[a-z][a-z0-9_./-]{0,31}")
_ARG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# payload map 1, args map 2: anything deeper is not a command.
_PAYLOAD_MAX_DEPTH: Final = 2

Scalar = int | float | str | bool | None


# -- errors ---------------------------------------------------------------------------------------------------------


class InvalidCommandError(InputError):
    """``sign_command`` was asked to sign something that is not a valid command (bad name, args, ttl or nonce)."""


class CommandRejected(InputError):  # noqa: N818 -- the name the protocol documents; subclasses name reasons
    """A command was refused; ``reason`` is a short stable name (counted and sent back in the reply).

    Attributes:
        reason: the rejection's name.
        command: the command, when its signature verified before the rejection (so a reply can name its nonce);
            None for input that was never authenticated.
    """

    reason: ClassVar[str] = "rejected"

    def __init__(self, detail: str, *, command: Command | None = None) -> None:
        """Create the rejection.

        Args:
            detail: what was wrong, for a human.
            command: the authenticated command, if it got that far.
        """
        self.command = command
        super().__init__(detail)


class CommandMalformed(CommandRejected):
    """Not a command of our profile: oversize, not COSE_Sign1, bad CBOR, wrong header or payload fields."""

    reason = "malformed"


class CommandUnsigned(CommandRejected):
    """No signature: an empty message, an empty signature, or no fleet key on the box to check one with."""

    reason = "unsigned"


class CommandBadSignature(CommandRejected):
    """The signature does not verify under the fleet command key."""

    reason = "bad_signature"


class CommandWrongDevice(CommandRejected):
    """A validly signed command addressed to another device."""

    reason = "wrong_device"


class CommandExpired(CommandRejected):
    """The command's expires-at has passed (by the box's clock or by fleet time)."""

    reason = "expired"


class CommandTooLong(CommandRejected):
    """The command's lifetime (expires-at - issued-at) exceeds what the box accepts."""

    reason = "too_long"


class UnknownCommand(CommandRejected):
    """The command's name is not one the box executes."""

    reason = "unknown_command"


class CommandReplayed(CommandRejected):
    """The command's nonce was seen before."""

    reason = "replayed"


class NonceStoreFull(CommandRejected):
    """The nonce set is full of unexpired nonces: new commands wait until fleet time passes some of them."""

    reason = "nonce_store_full"


class CommandsUnavailable(CommandRejected):
    """The box cannot take commands now (its nonce file cannot be read or written)."""

    reason = "unavailable"


def base_time(clock: float, build_time: float) -> float:
    """The box's own notion of the present, without any signed time: ``max(clock, build_time)``.

    Args:
        clock: the box's wall clock (epoch seconds); a non-finite value counts as unset.
        build_time: the running code's release time.
    """
    if not math.isfinite(clock):
        return build_time
    return max(float(clock), build_time)


# -- the command ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A verified command.

    Attributes:
        device_id: the device it is addressed to.
        name: what to do (e.g. ``ping``).
        args: its arguments (string keys, scalar values).
        nonce: 16 random bytes, unique per command.
        issued_at: when the fleet signed it (epoch seconds, fleet clock).
        expires_at: after this it must not be executed (epoch seconds).
    """

    device_id: str
    name: str
    args: Mapping[str, Scalar]
    nonce: bytes
    issued_at: float
    expires_at: float


def _check_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(f"command name {name!r:.80} is not [a-z][a-z0-9_./-]{{0,31}}")
    return name


def _check_args(args: object) -> dict[str, Scalar]:
    if not isinstance(args, Mapping):
        raise ValueError(f"args must be a map, got {type(args).__name__}")
    if len(args) > MAX_ARGS:
        raise ValueError(f"at most {MAX_ARGS} args, got {len(args)}")
    out: dict[str, Scalar] = {}
    for k, v in args.items():
        if not isinstance(k, str) or _ARG_KEY.fullmatch(k) is None:
            raise ValueError(f"arg name {k!r:.80} is not [A-Za-z0-9_.-]{{1,64}}")
        if isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                raise ValueError(f"arg {k!r}: integer out of the 64-bit range")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"arg {k!r}: NaN and infinities are not allowed")
        elif isinstance(v, str):
            if len(v) > MAX_ARG_STR:
                raise ValueError(f"arg {k!r}: strings are at most {MAX_ARG_STR} characters")
        else:
            raise ValueError(f"arg {k!r}: {type(v).__name__} is not a scalar (int, float, str, bool, null)")
        out[k] = v
    return out


def _check_time(what: str, t: object) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or not 0 <= t <= MAX_EPOCH:
        raise ValueError(f"{what} must be epoch seconds in 0..{MAX_EPOCH:.0f}, got {t!r:.40}")
    return float(t)


def sign_command(
    key: Ed25519PrivateKey,
    device_id: str,
    name: str,
    args: Mapping[str, Scalar],
    *,
    now: float,
    ttl_s: float = 60,
    nonce: bytes | None = None,
) -> bytes:
    """Sign a command for one device.

    Args:
        key: the fleet command key.
        device_id: the device it is for.
        name: the command, ``[a-z][a-z0-9_./-]{0,31}`` (e.g. ``ping``, ``status``, ``models/update``).
        args: at most 16 arguments: names ``[A-Za-z0-9_.-]{1,64}``, values int (64-bit), float (finite), str (at
            most 256 characters), bool or None.
        now: issued-at, epoch seconds (the gateway's clock).
        ttl_s: lifetime in seconds (> 0): expires-at = now + ttl_s.
        nonce: 16 bytes; None draws them from ``secrets`` (give one only in tests).

    Returns:
        The COSE_Sign1 bytes to publish on ``devices/<id>/commands``.

    Raises:
        InvalidCommandError: an argument is invalid, or the command would exceed ``MAX_COMMAND_BYTES``.
    """
    try:
        validate_device_id(device_id)
        _check_name(name)
        clean = _check_args(args)
        issued = _check_time("now", now)
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s must be a positive finite number, got {ttl_s!r}")
        expires = _check_time("now + ttl_s", issued + float(ttl_s))
        nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    except (ValueError, InvalidDeviceIdError) as e:
        raise InvalidCommandError(f"cannot sign command: {e}") from e
    payload = {
        KEY_VERSION: VERSION,
        KEY_DEVICE: device_id,
        KEY_NAME: name,
        KEY_ARGS: clean,
        KEY_NONCE: nonce,
        KEY_ISSUED_AT: issued,
        KEY_EXPIRES_AT: expires,
    }
    data = sign1(
        cbor2.dumps(payload, canonical=True),
        key,
        protected={HEADER_ALG: ALG_EDDSA, HEADER_KID: COMMAND_KID},
        unprotected={},
    )
    if len(data) > MAX_COMMAND_BYTES:
        raise InvalidCommandError(f"command is {len(data)} bytes, more than {MAX_COMMAND_BYTES}")
    return data


def _decode_payload(payload: bytes) -> Command:
    try:
        body = loads_strict(payload, _PAYLOAD_MAX_DEPTH)
    except DECODE_ERRORS as e:
        raise CommandMalformed(f"payload is not well-formed CBOR: {e}") from e
    if type(body) is not dict:
        raise CommandMalformed("payload must be a map")
    if set(body) != _PAYLOAD_KEYS:
        missing = sorted(_PAYLOAD_KEYS - set(body), key=repr)
        extra = sorted(repr(k) for k in set(body) - _PAYLOAD_KEYS)[:5]
        raise CommandMalformed(f"payload keys must be 1..7 exactly (missing {missing}, unknown {extra})")
    if body[KEY_VERSION] != VERSION or type(body[KEY_VERSION]) is not int:
        raise CommandMalformed(f"unsupported command version {body[KEY_VERSION]!r:.20}")
    try:
        device_id = validate_device_id(body[KEY_DEVICE])
        name = _check_name(body[KEY_NAME])
        args = _check_args(body[KEY_ARGS])
        issued_at = _check_time("issued-at", body[KEY_ISSUED_AT])
        expires_at = _check_time("expires-at", body[KEY_EXPIRES_AT])
    except (ValueError, InvalidDeviceIdError) as e:
        raise CommandMalformed(str(e)) from e
    nonce = body[KEY_NONCE]
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise CommandMalformed(f"nonce must be {NONCE_BYTES} bytes")
    if expires_at < issued_at:
        raise CommandMalformed(f"expires-at {expires_at} is before issued-at {issued_at}")
    return Command(device_id, name, args, nonce, issued_at, expires_at)


def _is_unsigned_sign1(data: bytes) -> bool:
    """Whether ``data`` is shaped like a COSE_Sign1 with no signature (an empty or nil signature field)."""
    try:
        outer = loads_strict(data, 4, allow_tag=COSE_SIGN1_TAG)
    except DECODE_ERRORS:
        return False
    value = outer.value if isinstance(outer, cbor2.CBORTag) and outer.tag == COSE_SIGN1_TAG else outer
    return isinstance(value, list | tuple) and len(value) == 4 and value[3] in (b"", None)


# -- the nonce set --------------------------------------------------------------------------------------------------


class NonceStore(Protocol):
    """Where a verifier remembers the nonces of accepted commands (see the module docstring's clock policy)."""

    def floor(self) -> float:
        """The fleet time proven by accepted commands (each issued-at, bounded by the box's time), 0.0 if none."""

    def not_before(self) -> float:
        """Commands issued before this time are expired (set by ``time/reset``), 0.0 if never reset."""

    def remember(self, nonce: bytes, *, issued_at: float, expires_at: float, limit: float) -> None:
        """Record the nonce of a command that passed every other check; raise the floor to ``min(issued_at, limit)``.

        Raises:
            CommandReplayed: the nonce is known.
            NonceStoreFull: no room without forgetting an unexpired nonce.
            CommandsUnavailable: the nonce could not be made durable.
        """

    def reset(self, to: float) -> bool:
        """Lower the floor to ``to`` and set not-before to it, if ``to`` is below the floor; True if it was.

        Raises:
            CommandsUnavailable: the change could not be made durable (nothing changed).
        """


_FILE_VERSION: Final = 1  # without not-before: what a set never reset is still written as, for older firmware
_FILE_VERSION_RESET: Final = 2  # with not-before (key 4)
NONCE_ENTRY_BYTES: Final = 32  # a [bstr16, float64] pair is 28 bytes of CBOR


def _finite(x: object) -> bool:
    return type(x) is float and math.isfinite(x)


class NonceSet:
    """The sans-IO nonce set: nonces with their expires-at, the fleet-time floor and the not-before time.

    Args:
        capacity: the most nonces held (>= 1).
        entries: nonce -> expires-at to start from.
        floor: the fleet-time floor to start from.
        not_before: commands issued before this are expired (the last ``time/reset``).
    """

    def __init__(
        self,
        capacity: int = DEFAULT_NONCE_CAPACITY,
        *,
        entries: Mapping[bytes, float] | None = None,
        floor: float = 0.0,
        not_before: float = 0.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: dict[bytes, float] = dict(entries or {})
        self._floor = float(floor)
        self._not_before = float(not_before)

    def __len__(self) -> int:
        """How many nonces are held."""
        return len(self._entries)

    def __contains__(self, nonce: object) -> bool:
        """Whether a nonce is held."""
        return nonce in self._entries

    def floor(self) -> float:
        """The fleet time proven by accepted commands, 0.0 if none."""
        return self._floor

    def not_before(self) -> float:
        """Commands issued before this are expired, 0.0 if never reset."""
        return self._not_before

    def copy(self) -> NonceSet:
        """An independent copy (the file store changes a copy and keeps it only once it is on disk)."""
        return NonceSet(self.capacity, entries=self._entries, floor=self._floor, not_before=self._not_before)

    def remember(self, nonce: bytes, *, issued_at: float, expires_at: float, limit: float = math.inf) -> None:
        """Record a nonce, forgetting those that fleet time has passed.

        Args:
            nonce: the command's nonce.
            issued_at: its issued-at (raises the floor, up to ``limit``).
            expires_at: its expires-at (how long the nonce must be kept).
            limit: the box's own time (``CommandVerifier``): a command from further in the future proves only this.

        Raises:
            CommandReplayed: the nonce is held (nothing changes).
            NonceStoreFull: the set is full of nonces that fleet time has not passed (nothing changes).
        """
        if nonce in self._entries:
            raise CommandReplayed(f"nonce {nonce.hex()} was seen before")
        floor = max(self._floor, min(issued_at, limit))
        # Forget only what fleet time has passed: such a command is expired by the floor, whatever the box's clock.
        kept = {n: exp for n, exp in self._entries.items() if exp >= floor}
        if len(kept) >= self.capacity:
            raise NonceStoreFull(
                f"{len(kept)} unexpired command nonces held (capacity {self.capacity}); they go as the box's time "
                "passes their expiry (a box whose clock is unset needs NTP or a confirmed OTA time for that)"
            )
        kept[nonce] = expires_at
        self._entries = kept
        self._floor = floor

    def reset(self, to: float) -> bool:
        """Lower the floor to ``to`` and make every command issued before ``to`` expired (``time/reset``).

        Nothing happens when ``to`` is not below the floor: then nothing was forgotten that a lower floor would make
        acceptable again. No nonce is forgotten by a reset (the floor only goes down).

        Args:
            to: the fleet's time, already bounded below by the box's own time (``CommandVerifier.reset_time``).

        Returns:
            True when the floor went down.
        """
        if not to < self._floor:
            return False
        self._floor = float(to)
        self._not_before = float(to)
        return True

    def encode(self) -> bytes:
        """The set as canonical CBOR: ``{1: 1, 2: floor, 3: [[nonce, expires-at], ...]}``, and ``4: not-before``
        with version 2 once the set was reset (a set never reset stays readable by older firmware)."""
        pairs = sorted([n, float(e)] for n, e in self._entries.items())
        body: dict[int, object] = {1: _FILE_VERSION, 2: self._floor, 3: pairs}
        if self._not_before:
            body.update({1: _FILE_VERSION_RESET, 4: self._not_before})
        return bytes(cbor2.dumps(body, canonical=True))

    @classmethod
    def decode(cls, data: bytes, capacity: int = DEFAULT_NONCE_CAPACITY) -> NonceSet:
        """Parse ``encode``'s output (either version).

        Args:
            data: the bytes.
            capacity: the capacity of the result (a file holding more nonces is still loaded, none forgotten).

        Returns:
            The set. A floor far in the future (a file written before the horizon rule) is kept as it is: lowering it
            here could reopen the replay of nonces it made the box forget; ``time/reset`` is the way down.

        Raises:
            ValueError: the bytes are not a nonce set of a known version.
        """
        try:
            body = loads_strict(data, 3)
        except DECODE_ERRORS as e:
            raise ValueError(f"not well-formed CBOR: {e}") from e
        if type(body) is not dict or body.get(1) not in (_FILE_VERSION, _FILE_VERSION_RESET):
            raise ValueError("not a version-1 or version-2 nonce set")
        keys = {1, 2, 3} if body[1] == _FILE_VERSION else {1, 2, 3, 4}
        if set(body) != keys:
            raise ValueError(f"a version-{body[1]} nonce set has keys {sorted(keys)}")
        floor, pairs, not_before = body[2], body[3], body.get(4, 0.0)
        if not _finite(floor) or not _finite(not_before) or type(pairs) is not list:
            raise ValueError("bad floor, not-before or entry list")
        entries: dict[bytes, float] = {}
        for p in pairs:
            ok = type(p) is list and len(p) == 2 and type(p[0]) is bytes and len(p[0]) == NONCE_BYTES
            if not ok or not _finite(p[1]) or p[0] in entries:
                raise ValueError("bad nonce entry")
            entries[p[0]] = p[1]
        return cls(max(capacity, len(entries)), entries=entries, floor=floor, not_before=not_before)


# -- the verifier ---------------------------------------------------------------------------------------------------


class CommandVerifier:
    """Verifies commands for one device (see the module docstring for the checks and the clock policy).

    Not thread-safe: call ``verify`` and ``reset_time`` from one thread (the MQTT network thread does).

    Args:
        public_key: the fleet command key.
        device_id: this device's id.
        seen: the nonce store.
        max_ttl_s: the longest lifetime accepted (expires-at - issued-at).
        allowed: the command names accepted; None: any (the executor decides).
        build_time: the release time of the code the box runs (``edge.ota.clock.BUILD_TIME``); 0.0 for a verifier
            that is not a box's (a simulator).

    Raises:
        InvalidDeviceIdError: ``device_id`` is not valid.
        ValueError: ``max_ttl_s`` is not positive.
    """

    def __init__(
        self,
        public_key: Ed25519PublicKey,
        device_id: str,
        *,
        seen: NonceStore,
        max_ttl_s: float = DEFAULT_MAX_TTL_S,
        allowed: Collection[str] | None = None,
        build_time: float = 0.0,
    ) -> None:
        if not max_ttl_s > 0:
            raise ValueError(f"max_ttl_s must be > 0, got {max_ttl_s}")
        self.public_key = public_key
        self.device_id = validate_device_id(device_id)
        self.seen = seen
        self.max_ttl_s = float(max_ttl_s)
        self.allowed = None if allowed is None else frozenset(allowed)
        self.build_time = float(build_time)

    def base(self, now: float, proven: float = 0.0) -> float:
        """The box's own time, which no single signed time can move: ``max(now, build time, proven)``.

        Args:
            now: the box's clock.
            proven: a time the box proved by other means (the OTA time floor's ``lower_bound``), 0.0 if none.
        """
        return max(base_time(now, self.build_time), proven)

    def verify(self, data: bytes, now: float, *, proven: float = 0.0) -> Command:
        """Verify one message from ``devices/<id>/commands``.

        Args:
            data: the message bytes (untrusted).
            now: the box's clock, epoch seconds (may be far behind on a box without RTC).
            proven: a time the box proved by other means (``TimeFloor.lower_bound``), 0.0 if none: the floor may
                rise up to ``base(now, proven)``.

        Returns:
            The command; its nonce is recorded, so the same bytes are refused next time.

        Raises:
            CommandRejected: a subclass naming the first check that failed (see the module docstring).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CommandMalformed(f"a command must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_COMMAND_BYTES:
            raise CommandMalformed(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
        if not data:
            raise CommandUnsigned("empty command")
        try:
            msg = decode_sign1(data)
        except MalformedEnvelopeError as e:
            if _is_unsigned_sign1(data):
                raise CommandUnsigned("COSE_Sign1 without a signature") from e
            raise CommandMalformed(f"not a signed command: {e}") from e
        if msg.protected.get(HEADER_KID) != COMMAND_KID or set(msg.protected) != {HEADER_ALG, HEADER_KID}:
            raise CommandMalformed("protected header must be exactly {alg: EdDSA, kid: 'fleet'}")
        if msg.unprotected:
            raise CommandMalformed("the unprotected header must be empty (it is not signed)")
        try:
            msg.verify(self.public_key)
        except BadSignatureError as e:
            raise CommandBadSignature("signature does not verify under the fleet command key") from e
        cmd = _decode_payload(msg.payload)
        if cmd.device_id != self.device_id:
            raise CommandWrongDevice(f"addressed to {cmd.device_id!r}, this is {self.device_id!r}", command=cmd)
        ttl = cmd.expires_at - cmd.issued_at
        if ttl > self.max_ttl_s:
            raise CommandTooLong(f"lifetime {ttl:.0f} s exceeds {self.max_ttl_s:.0f} s", command=cmd)
        self._check_time(cmd, now)
        if self.allowed is not None and cmd.name not in self.allowed:
            raise UnknownCommand(f"unknown command {cmd.name!r}", command=cmd)
        try:
            self.seen.remember(
                cmd.nonce, issued_at=cmd.issued_at, expires_at=cmd.expires_at, limit=self.base(now, proven)
            )
        except CommandRejected as e:
            e.command = cmd
            raise
        return cmd

    def _check_time(self, cmd: Command, now: float) -> None:
        floor = self.seen.floor()
        times = {"box clock": now, "fleet time of the last accepted command": floor, "build time": self.build_time}
        which, clock = max(times.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else -math.inf)
        if clock > cmd.expires_at:
            raise CommandExpired(
                f"expired at {cmd.expires_at:.3f}, the box's time is {clock:.3f} ({which}); a box whose floor is "
                "wrongly ahead is recovered by time/reset (docs/commands.md)",
                command=cmd,
            )
        not_before = self.seen.not_before()
        if cmd.issued_at < not_before:
            raise CommandExpired(
                f"issued at {cmd.issued_at:.3f}, before the time reset to {not_before:.3f}: only commands issued "
                "since then are accepted",
                command=cmd,
            )

    def reset_time(self, to: float, now: float, *, proven: float = 0.0) -> bool:
        """Apply a verified ``time/reset``: lower the floor to ``max(to, base(now, proven))`` and refuse every command
        issued before that from now on (see the module docstring).

        Args:
            to: the fleet's time the command carries.
            now: the box's clock.
            proven: as for ``verify``.

        Returns:
            True when the floor went down; False when it was not above that time (nothing changes then).

        Raises:
            CommandsUnavailable: the change could not be made durable (nothing changed).
        """
        return self.seen.reset(max(float(to), self.base(now, proven)))
