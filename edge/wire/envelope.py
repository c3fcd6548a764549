"""Signed telemetry envelopes: batches of records in one COSE_Sign1, chained per device.

Format (CDDL in docs/telemetry.md):
- COSE_Sign1, tag 18; protected header ``{1: -8, 4: h'<device id as UTF-8>'}`` (alg EdDSA; kid signed);
  unprotected header empty; no external AAD.
- payload: ``{1: 1 (schema version), 2: device id, 3: counter, 4: prev, 5: created, 6: [records]}``.

Invariants:
- Counter: starts at 1 and grows by exactly 1 per envelope per device. ``prev`` is the SHA-256 of the previous
  envelope's complete COSE bytes, 32 zero bytes for counter 1 (and only for counter 1).
- An envelope is the canonical encoding of its four parts (``D2 84 <protected> A0 <payload> 58 40 <signature>``):
  the chain hashes complete bytes, and the unprotected header and the CBOR heads are not signed, so any other
  encoding would let anyone on the path mint a second "envelope" with a valid signature and a different hash. Only
  the canonical one is accepted; Ed25519 signatures themselves are not malleable (OpenSSL checks S < L).
- ``open_envelope`` checks the size, then the structure and header, then the signature over the raw bytes, and only
  then decodes the payload, under ``TelemetryLimits``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id
from edge.wire._bounds import MAX_COUNTER, MAX_EPOCH
from edge.wire._cbor import DECODE_ERRORS, new_decoder, read_head
from edge.wire.cose import ALG_EDDSA, COSE_SIGN1_TAG, HEADER_ALG, HEADER_KID, Sign1Message, decode_sign1, sign1
from edge.wire.errors import MalformedEnvelopeError, MalformedRecordError
from edge.wire.schema import (
    DEFAULT_LIMITS,
    LossNotice,
    TelemetryLimits,
    TelemetryRecord,
    encode_records,
    read_record_array,
)

__all__ = [
    "GENESIS_PREV",
    "SCHEMA_VERSION",
    "Batcher",
    "Envelope",
    "EnvelopeLayout",
    "envelope_hash",
    "first_record",
    "open_envelope",
    "parse_envelope",
    "read_payload",
    "seal_envelope",
]

SCHEMA_VERSION: Final = 1
GENESIS_PREV: Final = bytes(32)
P_VERSION, P_DEVICE, P_COUNTER, P_PREV, P_CREATED, P_RECORDS = 1, 2, 3, 4, 5, 6
_PAYLOAD_KEYS = frozenset(range(1, 7))


@dataclass(frozen=True, slots=True)
class Envelope:
    """An envelope whose signature verified and whose payload passed the schema.

    Attributes:
        device_id: the signer (kid) and payload device id, which must agree.
        counter: the per-device envelope counter (>= 1).
        prev: SHA-256 of the previous envelope's bytes (zeros for counter 1).
        created: when the device sealed it (epoch seconds).
        records: the records, in order.
        hash: SHA-256 of this envelope's complete bytes (the next envelope's ``prev``).
        version: the payload schema version.
    """

    device_id: str
    counter: int
    prev: bytes
    created: float
    records: tuple[TelemetryRecord, ...]
    hash: bytes
    version: int = SCHEMA_VERSION


def envelope_hash(data: bytes) -> bytes:
    """The chain hash of an envelope: SHA-256 of its complete COSE bytes.

    Args:
        data: the envelope as sent.

    Returns:
        32 bytes.
    """
    return hashlib.sha256(data).digest()


def _check_chain_fields(counter: int, prev: bytes) -> None:
    if type(counter) is not int or not 1 <= counter <= MAX_COUNTER:
        raise MalformedEnvelopeError(f"counter {counter!r}: expected an integer in 1..2**53")
    if type(prev) is not bytes or len(prev) != 32:
        raise MalformedEnvelopeError("prev: expected a 32-byte SHA-256")
    if (counter == 1) != (prev == GENESIS_PREV):
        raise MalformedEnvelopeError("prev must be 32 zero bytes exactly when counter is 1 (the genesis envelope)")


def _check_losses(records: Sequence[TelemetryRecord], counter: int) -> None:
    for r in records:
        # A box announces only envelopes it sealed before this one: a notice reaching past its own counter is not a
        # loss, it would only inflate the ledger's loss figures.
        if type(r) is LossNotice and r.last_counter >= counter:
            raise MalformedRecordError(
                f"loss notice names counters up to {r.last_counter}, at or after its own envelope's {counter}"
            )


def seal_envelope(  # noqa: PLR0917 -- positional order mirrors the payload map
    device_id: str,
    counter: int,
    prev_hash: bytes,
    records: Sequence[TelemetryRecord],
    created: float,
    key: Ed25519PrivateKey,
    *,
    limits: TelemetryLimits = DEFAULT_LIMITS,
) -> bytes:
    """Encode and sign one envelope (one signature for all its records).

    Args:
        device_id: the device id (kid and payload field).
        counter: this envelope's counter (1 for the first, then previous + 1).
        prev_hash: ``envelope_hash`` of the previous envelope, ``GENESIS_PREV`` for counter 1.
        records: at most ``limits.max_records``; each at most ``limits.max_record_bytes``.
        created: when it was sealed (epoch seconds).
        key: the device's private key.
        limits: the limits a verifier will apply; sealing refuses what it would reject.

    Returns:
        The envelope bytes (canonical tagged COSE_Sign1).

    Raises:
        InvalidDeviceIdError: ``device_id`` is not valid.
        MalformedEnvelopeError: counter, prev or created out of range, or the envelope exceeds its size limit.
        MalformedRecordError: too many records, or a record is invalid or oversized.
    """
    validate_device_id(device_id)
    _check_chain_fields(counter, prev_hash)
    _check_losses(records, counter)
    if not isinstance(created, float | int) or not 0 <= created <= MAX_EPOCH or not math.isfinite(created):
        raise MalformedEnvelopeError(f"created {created!r}: expected epoch seconds")
    head = cbor2.dumps(
        {
            P_VERSION: SCHEMA_VERSION,
            P_DEVICE: device_id,
            P_COUNTER: counter,
            P_PREV: prev_hash,
            P_CREATED: float(created),
            P_RECORDS: [],
        },
        canonical=True,
    )
    # The map's last entry is the (empty) record array: splice the records' canonical encodings in after its head,
    # so each is encoded (and size-checked) once. Keys 1..6 sort before anything else: key 6 is last.
    payload = head[:-1] + encode_records(records, limits)
    data = sign1(
        payload,
        key,
        protected={HEADER_ALG: ALG_EDDSA, HEADER_KID: device_id.encode("utf-8")},
        unprotected={},
    )
    if len(data) > limits.max_envelope_bytes:
        raise MalformedEnvelopeError(f"envelope is {len(data)} bytes, limit {limits.max_envelope_bytes}")
    return data


def parse_envelope(data: bytes, limits: TelemetryLimits = DEFAULT_LIMITS) -> tuple[str, Sign1Message]:
    """Check an envelope's size, structure, canonical form and header, and name its signer; no signature check.

    This is the step before the key lookup: the device id comes from the (signed, not yet verified) kid.

    Args:
        data: the envelope bytes.
        limits: ``max_envelope_bytes`` is checked before any decoding.

    Returns:
        (device id from the kid, the parsed message).

    Raises:
        MalformedEnvelopeError: oversized, not a canonical COSE_Sign1 of this profile, or a kid that is not a
            valid device id.
        UnsupportedAlgorithmError: the algorithm is not EdDSA.
    """
    if not isinstance(data, bytes):
        raise MalformedEnvelopeError(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_envelope_bytes:
        raise MalformedEnvelopeError(f"envelope is {len(data)} bytes, limit {limits.max_envelope_bytes}")
    msg = decode_sign1(data)
    if msg.unprotected:
        raise MalformedEnvelopeError("the unprotected header must be empty (it is not signed)")
    if set(msg.protected) != {HEADER_ALG, HEADER_KID}:
        raise MalformedEnvelopeError(
            f"protected header must hold exactly alg and kid, got labels {list(msg.protected)}"
        )
    kid = msg.protected[HEADER_KID]
    if type(kid) is not bytes:
        raise MalformedEnvelopeError("kid must be a byte string")
    try:
        device_id = validate_device_id(kid.decode("utf-8"))
    except (UnicodeDecodeError, InvalidDeviceIdError) as e:
        raise MalformedEnvelopeError(f"kid is not a valid device id: {kid!r:.80}") from e
    canonical = cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [msg.protected_bytes, {}, msg.payload, msg.signature]))
    if canonical != data:
        raise MalformedEnvelopeError("envelope is not canonically encoded (its hash would not be unique)")
    return device_id, msg


class EnvelopeLayout:
    """The fixed bytes of one device's canonical envelopes, checked without decoding (a store's cheap check).

    A canonical envelope is ``D2 84 <bstr protected> A0 <bstr payload> 58 40 <signature>``; for one device the
    protected header is fixed, and the payload starts ``{1: 1, 2: device, 3: counter, ...}`` (keys in order). So
    whether stored bytes are this device's envelope for a given counter is a prefix comparison, not a parse. This is
    no verification: it finds bytes moved to another counter or another file, the signature is the gateway's check.
    """

    def __init__(self, device_id: str) -> None:
        """The layout of ``device_id``'s envelopes.

        Raises:
            InvalidDeviceIdError: ``device_id`` is not valid.
        """
        validate_device_id(device_id)
        protected = cbor2.dumps({HEADER_ALG: ALG_EDDSA, HEADER_KID: device_id.encode("utf-8")}, canonical=True)
        self._envelope_prefix = bytes([0xC0 | COSE_SIGN1_TAG, 0x84]) + cbor2.dumps(protected) + b"\xa0"
        # map(6), version key and value, device key, device id, counter key: the counter follows.
        self._payload_prefix = b"\xa6" + cbor2.dumps(P_VERSION) + cbor2.dumps(SCHEMA_VERSION)
        self._payload_prefix += cbor2.dumps(P_DEVICE) + cbor2.dumps(device_id) + cbor2.dumps(P_COUNTER)

    def fault(self, data: bytes, counter: int) -> str | None:
        """Why ``data`` is not this device's canonical envelope for ``counter``, or None if its layout is.

        Checks the header bytes and the start of the payload (its device and counter); reads nothing beyond them.
        """
        start = len(self._envelope_prefix)
        if not data.startswith(self._envelope_prefix) or len(data) <= start or data[start] >> 5 != 2:
            return "not an envelope of this device"
        width = {24: 1, 25: 2, 26: 4, 27: 8}.get(data[start] & 0x1F, 0)  # the payload's byte-string head
        if not width or not data.startswith(self._payload_prefix + cbor2.dumps(counter), start + 1 + width):
            return "a valid envelope, but not the one for this counter"
        return None

    def payload_fault(self, payload: bytes, counter: int) -> str | None:
        """Why ``payload`` (of a parsed envelope) is not this device's canonical payload for ``counter``, or None."""
        if not payload.startswith(self._payload_prefix + cbor2.dumps(counter)):
            return "a valid envelope, but not the one for this counter"
        return None


def first_record(payload: bytes, limits: TelemetryLimits = DEFAULT_LIMITS) -> object:
    """The first record of a canonical payload as a decoded CBOR item, without decoding the others.

    Only the payload's scalars and that one record are read (a 100-record payload costs ~0.2 ms to decode whole).
    The item is not validated: pass it to ``record_from_item``.

    Args:
        payload: a payload in canonical form (keys 1..6 in order, the record array last).
        limits: ``max_depth`` applies.

    Returns:
        The item, or None when the payload is not a map or its record array is empty.

    Raises:
        The CBOR decoder's errors (``edge.wire._cbor.DECODE_ERRORS``) on malformed bytes.
    """
    fp = io.BytesIO(payload)
    major, pairs = read_head(fp)
    decoder = new_decoder(fp, limits.max_depth)
    for _ in range(pairs if major == 5 else 0):
        if decoder.decode() == P_RECORDS:
            major, count = read_head(fp)
            return decoder.decode() if major == 4 and count else None
        decoder.decode()
    return None


def read_payload(
    payload: bytes, device_id: str, data_hash: bytes, limits: TelemetryLimits = DEFAULT_LIMITS
) -> Envelope:
    """Decode and validate a payload whose signature has been verified.

    Args:
        payload: the payload bytes.
        device_id: the kid the signature was verified for; the payload must name the same device.
        data_hash: ``envelope_hash`` of the complete envelope.
        limits: the limits.

    Returns:
        The envelope.

    Raises:
        MalformedEnvelopeError: the payload map is malformed, names another device, or breaks a chain rule.
        MalformedRecordError: a record is invalid or a record limit is exceeded.
    """
    fp = io.BytesIO(payload)
    fields: dict[int, object] = {}
    records: list[TelemetryRecord] = []
    try:
        major, pairs = read_head(fp)
        if major != 5 or pairs != len(_PAYLOAD_KEYS):
            raise MalformedEnvelopeError(f"payload must be a map of {len(_PAYLOAD_KEYS)} entries")
        # Scalars only outside the record array: depth 1 is enough and refuses nested junk cheaply.
        scalars = new_decoder(fp, 1)
        for _ in range(pairs):
            key = scalars.decode()
            if type(key) is not int or key not in _PAYLOAD_KEYS or key in fields:
                raise MalformedEnvelopeError(f"payload key {key!r:.20}: expected each of 1..6 once")
            if key == P_RECORDS:
                records = read_record_array(fp, limits)
                fields[key] = None
            else:
                fields[key] = scalars.decode()
    except (MalformedEnvelopeError, MalformedRecordError):
        raise  # already typed; they are ValueErrors too, which the next clause would rewrap
    except DECODE_ERRORS as e:
        raise MalformedEnvelopeError(f"payload is not valid CBOR: {e}") from e
    if fp.tell() != len(payload):
        raise MalformedEnvelopeError("trailing bytes after the payload map")
    if fields[P_VERSION] != SCHEMA_VERSION or type(fields[P_VERSION]) is not int:
        raise MalformedEnvelopeError(f"schema version {fields[P_VERSION]!r}: expected {SCHEMA_VERSION}")
    if fields[P_DEVICE] != device_id:
        raise MalformedEnvelopeError(f"payload device {fields[P_DEVICE]!r:.80} differs from the kid {device_id!r}")
    counter, prev, created = fields[P_COUNTER], fields[P_PREV], fields[P_CREATED]
    _check_chain_fields(counter, prev)  # type: ignore[arg-type]
    if type(created) is int:
        created = float(created)
    if type(created) is not float or not math.isfinite(created) or not 0 <= created <= MAX_EPOCH:
        raise MalformedEnvelopeError(f"created {created!r:.40}: expected epoch seconds")
    _check_losses(records, counter)  # type: ignore[arg-type]
    return Envelope(device_id, counter, prev, created, tuple(records), data_hash)  # type: ignore[arg-type]


def open_envelope(data: bytes, public_key: Ed25519PublicKey, limits: TelemetryLimits = DEFAULT_LIMITS) -> Envelope:
    """Verify and decode an envelope (no chain check: see ``edge.wire.chain.ChainVerifier``).

    Args:
        data: the envelope bytes.
        public_key: the key of the device the kid names (the caller looked it up).
        limits: the limits.

    Returns:
        The envelope.

    Raises:
        MalformedEnvelopeError: oversized or malformed (checked before the signature), or a bad payload.
        UnsupportedAlgorithmError: not EdDSA.
        BadSignatureError: the signature does not verify (checked before the payload is decoded).
        MalformedRecordError: a record is invalid or a record limit is exceeded.
    """
    device_id, msg = parse_envelope(data, limits)
    msg.verify(public_key)
    return read_payload(msg.payload, device_id, envelope_hash(data), limits)


T = TypeVar("T")


class Batcher(Generic[T]):
    """Groups records into batches by count and by age; sans-IO, the caller passes a monotonic ``now``.

    A batch is released when it holds ``max_records`` records, or when its oldest record is ``max_age_s`` old
    (checked on ``add`` and ``due``), or on ``flush``. Records keep their order; none is dropped.
    """

    def __init__(self, max_records: int, max_age_s: float) -> None:
        """Create an empty batcher.

        Args:
            max_records: batch size that releases a batch at once (>= 1).
            max_age_s: age of the oldest pending record that releases a batch (> 0).

        Raises:
            ValueError: a bound is not positive.
        """
        if max_records < 1 or not max_age_s > 0:
            raise ValueError(f"Batcher needs max_records >= 1 and max_age_s > 0, got {max_records}, {max_age_s}")
        self.max_records = max_records
        self.max_age_s = max_age_s
        self._pending: list[T] = []
        self._since = 0.0

    def __len__(self) -> int:
        """The number of pending records."""
        return len(self._pending)

    def deadline(self) -> float | None:
        """When the pending batch becomes due (in the caller's clock), or None when empty."""
        return self._since + self.max_age_s if self._pending else None

    def add(self, record: T, now: float) -> list[T] | None:
        """Add a record.

        Args:
            record: the record.
            now: the current monotonic time (seconds).

        Returns:
            A batch to seal if this record filled it or the batch is due, else None.
        """
        if not self._pending:
            self._since = now
        self._pending.append(record)
        if len(self._pending) >= self.max_records or now - self._since >= self.max_age_s:
            return self.flush()
        return None

    def due(self, now: float) -> list[T] | None:
        """Release the pending batch if its oldest record has waited ``max_age_s``.

        Args:
            now: the current monotonic time (seconds).

        Returns:
            The batch, or None if it is empty or not yet due.
        """
        if self._pending and now - self._since >= self.max_age_s:
            return self.flush()
        return None

    def flush(self) -> list[T]:
        """Release whatever is pending (at shutdown).

        Returns:
            The pending records, possibly none.
        """
        batch, self._pending = self._pending, []
        return batch
