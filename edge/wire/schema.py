"""The telemetry record schema: compact CBOR maps with small integer keys (CDDL in docs/telemetry.md).

Every record is a CBOR map; key 0 is the record type, key 1 the timestamp (epoch seconds); the other keys depend on
the type: 1 inference, 2 reading, 3 loss notice, 4 event. Unknown types and unknown keys are rejected, not skipped: a
verifier that cannot check a field must not vouch for it.

Invariants:
- Decoding never trusts the input: the byte size is checked before decoding, the CBOR decoder refuses tags,
  duplicate keys, indefinite lengths, trailing bytes and nesting beyond ``TelemetryLimits.max_depth``; the record
  count of an array is read from its header and checked before any record is decoded; types and ranges are checked
  after decoding. Every failure is a ``MalformedRecordError``.
- Encoding is canonical (RFC 8949 core deterministic: shortest integers and floats, sorted keys), so a record has
  exactly one encoding, and runs the decoder's checks, so a device never signs a record a verifier would reject.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from edge.wire._bounds import (
    INT64_MAX,
    INT64_MIN,
    MAX_COUNTER,
    MAX_EPOCH,
    MAX_RECORDS_PER_ENVELOPE,
    UINT32_MAX,
)
from edge.wire._cbor import DECODE_ERRORS, loads_strict, new_decoder, read_head
from edge.wire.errors import MalformedRecordError
from edge.wire.records import InferenceRecord, ReadingRecord

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_UNSEALED_RECORDS",
    "EventRecord",
    "EventValue",
    "LossNotice",
    "TelemetryLimits",
    "TelemetryRecord",
    "decode_record",
    "decode_records",
    "encode_record",
    "encode_records",
    "read_record_array",
    "record_from_item",
    "record_to_item",
]

EventValue = int | float | str | bytes | bool | None


@dataclass(frozen=True, slots=True)
class LossNotice:
    """Telemetry the device dropped unsent (its outbox or its sink was full): loss is reported, never silent.

    Attributes:
        timestamp: when the drop happened (epoch seconds).
        envelopes_dropped: how many sealed envelopes were dropped (0 when only unsealed records were).
        records_dropped: how many records those envelopes held.
        first_counter, last_counter: the lowest and highest envelope counter dropped (a gap at the gateway over
            exactly these counters is explained by this notice); both 0 when no envelope was dropped.
        unsealed_records: records dropped before they were sealed, so before they got a counter (key 6, absent
            when 0: notices without it decode as before).
    """

    timestamp: float
    envelopes_dropped: int
    records_dropped: int
    first_counter: int
    last_counter: int
    unsealed_records: int = 0


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A state change worth reporting (OTA transitions, status): a kind and a small flat map of scalars.

    Attributes:
        timestamp: when it happened (epoch seconds).
        kind: dotted lower-case name, e.g. ``ota.committed``.
        data: up to 32 entries, text keys, scalar values (int, float, text, bytes, bool, None).
    """

    timestamp: float
    kind: str
    data: Mapping[str, EventValue] = field(default_factory=dict)


TelemetryRecord = InferenceRecord | ReadingRecord | LossNotice | EventRecord


@dataclass(frozen=True, slots=True)
class TelemetryLimits:
    """Bounds on untrusted telemetry, enforced while decoding.

    Attributes:
        max_record_bytes: the largest encoded record.
        max_records: the most records in one envelope (at most ``MAX_RECORDS_PER_ENVELOPE``, the contract's bound).
        max_envelope_bytes: the largest complete COSE envelope; checked before any decoding.
        max_depth: the deepest container nesting in an envelope payload (payload map, record array, record map,
            top-k list, pair: 5 are needed).
    """

    max_record_bytes: int = 4096
    max_records: int = MAX_RECORDS_PER_ENVELOPE
    max_envelope_bytes: int = 512 * 1024
    max_depth: int = 6

    def __post_init__(self) -> None:
        if self.max_record_bytes < 64 or self.max_records < 1 or self.max_envelope_bytes < 256:
            raise ValueError(f"telemetry limits too small to hold any envelope: {self}")
        if self.max_records > MAX_RECORDS_PER_ENVELOPE:
            raise ValueError(f"max_records {self.max_records} > {MAX_RECORDS_PER_ENVELOPE}, the contract's bound")
        if self.max_depth < 5:
            raise ValueError(f"max_depth {self.max_depth} < 5: records with top-k could never decode")


DEFAULT_LIMITS: Final = TelemetryLimits()

# Record types (key 0).
TYPE_INFERENCE: Final = 1
TYPE_READING: Final = 2
TYPE_LOSS: Final = 3
TYPE_EVENT: Final = 4

# Keys common to every record type.
K_TYPE: Final = 0
K_TIMESTAMP: Final = 1
# Inference.
K_SEQ, K_MODEL_ID, K_MODEL_SHA256, K_INPUT_SHA256, K_PIXEL_FORMAT = 2, 3, 4, 5, 6
K_TOP_K, K_SCORE, K_LABEL, K_TIMINGS, K_BACKEND = 7, 8, 9, 10, 11
# Reading.
K_CHANNEL, K_VALUE = 2, 3
# Loss notice.
K_ENVELOPES_DROPPED, K_RECORDS_DROPPED, K_FIRST_COUNTER, K_LAST_COUNTER, K_UNSEALED_RECORDS = 2, 3, 4, 5, 6
# Event.
K_KIND, K_DATA = 2, 3

_INFERENCE_KEYS = frozenset(range(12))
_INFERENCE_REQUIRED = _INFERENCE_KEYS - {K_SCORE, K_LABEL}
_OPTIONAL_SETS: tuple[frozenset[int], ...] = (frozenset(), frozenset({K_SCORE}), frozenset({K_LABEL}))
_INFERENCE_KEYSETS = frozenset(_INFERENCE_REQUIRED | extra for extra in (*_OPTIONAL_SETS, _INFERENCE_KEYS))
_READING_KEYS = frozenset({K_TYPE, K_TIMESTAMP, K_CHANNEL, K_VALUE})
_LOSS_REQUIRED = frozenset(range(6))
_LOSS_KEYS = _LOSS_REQUIRED | {K_UNSEALED_RECORDS}
# Records a sink dropped before sealing, per notice. A box that drops more announces the rest in its next notices.
# The bound keeps the ledger's loss sum in 64 bits: the counter ranges add at most MAX_COUNTER x 1000 (``_bounds``),
# and the headroom left (2.1e17) takes more than 2e11 accepted envelopes at this bound, each a signed message the
# gateway must receive, where the ranges are mere claims. It also fits the outbox's 64-byte room for a notice.
MAX_UNSEALED_RECORDS: Final = 1 << 20
_EVENT_KEYS = frozenset({K_TYPE, K_TIMESTAMP, K_KIND, K_DATA})

# Field bounds (part of the schema, stated in the CDDL; the numeric ones and their reasons are in ``_bounds``).
_MAX_MODEL_ID = 128
_MAX_PIXEL_FORMAT = 16
_MAX_BACKEND = 32
_MAX_KIND = 64
_MAX_TOP_K = 64
_MAX_EVENT_ENTRIES = 32
_MAX_EVENT_KEY = 64
_MAX_EVENT_VALUE = 256


# ---------------------------------------------------------------------------------------------------------- checks


def _fail(what: str, value: object, expected: str) -> MalformedRecordError:
    return MalformedRecordError(f"{what}: got {value!r:.60}, expected {expected}")


def _uint(value: object, what: str, maximum: int = INT64_MAX) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise _fail(what, value, f"an unsigned integer <= {maximum}")
    return value


def _float(value: object, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    # Integers are accepted for float fields: a third-party encoder may write 1700000000.0 as 1700000000.
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value) or not lo <= value <= hi:
        raise _fail(what, value, f"a finite number in [{lo}, {hi}]")
    return value


def _text(value: object, what: str, max_len: int) -> str:
    if type(value) is not str or not 0 < len(value) <= max_len:
        raise _fail(what, value, f"a text string of 1..{max_len} characters")
    return value


def _ident(value: object, what: str, max_len: int) -> str:
    # Names the gateway stores in text columns and prints: printable only. NUL would make PostgreSQL refuse the whole
    # batch; control characters and line separators would forge lines in logs and tables.
    if type(value) is not str or not 0 < len(value) <= max_len or not value.isprintable():
        raise _fail(what, value, f"a printable text string of 1..{max_len} characters")
    return value


def _sha256(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise _fail(what, value, "a 32-byte SHA-256 byte string")
    return value


def _keys(item: Mapping[Any, Any], allowed: frozenset[int], required: frozenset[int], kind: str) -> None:
    keys = item.keys()
    if not keys <= allowed:
        raise MalformedRecordError(f"{kind} record has unknown keys {sorted(map(repr, keys - allowed))}")
    if not required <= keys:
        raise MalformedRecordError(f"{kind} record lacks keys {sorted(required - keys)}")


def _timestamp(item: Mapping[Any, Any]) -> float:
    return _float(item[K_TIMESTAMP], "timestamp", 0.0, MAX_EPOCH)


# Identifiers already checked: a box repeats its model id, pixel format and backend in every record, and the gateway
# checks them once instead of a hundred times an envelope. Only valid strings enter; bounded, cleared when full.
_KNOWN_IDENTS: dict[tuple[str, int], bool] = {}
_KNOWN_IDENTS_MAX: Final = 4096


def _known_ident(value: object, what: str, max_len: int) -> str:
    if type(value) is str and (value, max_len) in _KNOWN_IDENTS:
        return value
    checked = _ident(value, what, max_len)
    if len(_KNOWN_IDENTS) >= _KNOWN_IDENTS_MAX:
        _KNOWN_IDENTS.clear()
    _KNOWN_IDENTS[checked, max_len] = True
    return checked


_SET_INFERENCE = tuple(getattr(InferenceRecord, f.name).__set__ for f in dataclasses.fields(InferenceRecord))


def _new_inference(  # noqa: PLR0917 -- InferenceRecord's fields, in order
    seq: int,
    timestamp: float,
    model_id: str,
    model_sha256: str,
    input_sha256: str,
    pixel_format: str,
    top_k: tuple[tuple[int, float], ...],
    score: float | None,
    label: int | None,
    preprocess_us: int,
    inference_us: int,
    latency_us: int,
    backend: str,
) -> InferenceRecord:
    """``InferenceRecord(...)`` for fields the caller has validated, filling the slots directly.

    A frozen dataclass's ``__init__`` assigns each field through ``object.__setattr__``; the gateway builds a hundred
    of these per envelope, and this builds the same object (equal, same hash, still frozen) in half the time.
    """
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12) = _SET_INFERENCE
    obj: Any = object.__new__(InferenceRecord)
    s0(obj, seq)
    s1(obj, timestamp)
    s2(obj, model_id)
    s3(obj, model_sha256)
    s4(obj, input_sha256)
    s5(obj, pixel_format)
    s6(obj, top_k)
    s7(obj, score)
    s8(obj, label)
    s9(obj, preprocess_us)
    s10(obj, inference_us)
    s11(obj, latency_us)
    s12(obj, backend)
    return obj  # type: ignore[no-any-return]


def _inference(item: Mapping[Any, Any]) -> InferenceRecord:
    # The hot path of the gateway (most records are inferences): each field is checked inline and falls back to the
    # helper only to raise, with its message. The checks are exactly the helpers' checks.
    if frozenset(item) not in _INFERENCE_KEYSETS:
        _keys(item, _INFERENCE_KEYS, _INFERENCE_REQUIRED, "inference")
    top_k_raw = item[K_TOP_K]
    if type(top_k_raw) is not list or len(top_k_raw) > _MAX_TOP_K:
        raise _fail("top_k", top_k_raw, f"an array of at most {_MAX_TOP_K} [class, score] pairs")
    top_k = []
    for pair in top_k_raw:
        if type(pair) is not list or len(pair) != 2:
            raise _fail("top_k entry", pair, "a [class, score] pair")
        c, score_k = pair
        if type(c) is not int or not 0 <= c <= UINT32_MAX:
            _uint(c, "top_k class", UINT32_MAX)
        if type(score_k) is not float or score_k - score_k != 0.0:  # x - x is 0.0 only for finite floats
            score_k = _float(score_k, "top_k score")
        top_k.append((c, score_k))
    timings = item[K_TIMINGS]
    if type(timings) is not list or len(timings) != 3:
        raise _fail("timings", timings, "[preprocess_us, inference_us, latency_us]")
    pre_us, inf_us, lat_us = timings
    if type(pre_us) is not int or not 0 <= pre_us <= INT64_MAX:
        _uint(pre_us, "preprocess_us")
    if type(inf_us) is not int or not 0 <= inf_us <= INT64_MAX:
        _uint(inf_us, "inference_us")
    if type(lat_us) is not int or not 0 <= lat_us <= INT64_MAX:
        _uint(lat_us, "latency_us")
    seq = item[K_SEQ]
    if type(seq) is not int or not 0 <= seq <= INT64_MAX:
        _uint(seq, "seq")
    ts = item[K_TIMESTAMP]
    if type(ts) is not float or not 0.0 <= ts <= MAX_EPOCH:
        ts = _timestamp(item)
    model_sha, input_sha = item[K_MODEL_SHA256], item[K_INPUT_SHA256]
    if type(model_sha) is not bytes or len(model_sha) != 32:
        _sha256(model_sha, "model_sha256")
    if type(input_sha) is not bytes or len(input_sha) != 32:
        _sha256(input_sha, "input_sha256")
    score = item.get(K_SCORE)
    if score is not None and (type(score) is not float or score - score != 0.0):
        score = _float(score, "score")
    label = item.get(K_LABEL)
    if label is not None and (type(label) is not int or not 0 <= label <= UINT32_MAX):
        _uint(label, "label", UINT32_MAX)
    if (score is None and K_SCORE in item) or (label is None and K_LABEL in item):
        raise _fail("score or label", None, "a value when the key is present")
    return _new_inference(
        seq,
        ts,
        _known_ident(item[K_MODEL_ID], "model_id", _MAX_MODEL_ID),
        model_sha.hex(),
        input_sha.hex(),
        _known_ident(item[K_PIXEL_FORMAT], "pixel_format", _MAX_PIXEL_FORMAT),
        tuple(top_k),
        score,
        label,
        pre_us,
        inf_us,
        lat_us,
        _known_ident(item[K_BACKEND], "backend", _MAX_BACKEND),
    )


def _reading(item: Mapping[Any, Any]) -> ReadingRecord:
    _keys(item, _READING_KEYS, _READING_KEYS, "reading")
    return ReadingRecord(
        channel=_uint(item[K_CHANNEL], "channel", UINT32_MAX),
        value=_float(item[K_VALUE], "value"),
        timestamp=_timestamp(item),
    )


def _loss(item: Mapping[Any, Any]) -> LossNotice:
    _keys(item, _LOSS_KEYS, _LOSS_REQUIRED, "loss")
    first = _uint(item[K_FIRST_COUNTER], "first_counter", MAX_COUNTER)
    last = _uint(item[K_LAST_COUNTER], "last_counter", MAX_COUNTER)
    envelopes = _uint(item[K_ENVELOPES_DROPPED], "envelopes_dropped")
    unsealed = 0
    if K_UNSEALED_RECORDS in item:
        # Present only when non-zero: each notice has one encoding.
        unsealed = _uint(item[K_UNSEALED_RECORDS], "unsealed_records", MAX_UNSEALED_RECORDS)
        if unsealed == 0:
            raise _fail("unsealed_records", unsealed, "1 or more (the key is omitted for 0)")
    if envelopes == 0 and unsealed:
        # Only records that never had a counter: no range to explain, and no envelope records.
        if (first, last, _uint(item[K_RECORDS_DROPPED], "records_dropped", 0)) != (0, 0, 0):
            raise MalformedRecordError(
                f"loss notice of unsealed records only: counters {first}..{last} must be 0..0, records_dropped 0"
            )
        return LossNotice(_timestamp(item), 0, 0, 0, 0, unsealed)
    if not 1 <= first <= last or not 1 <= envelopes <= last - first + 1:
        raise MalformedRecordError(
            f"loss notice: counters {first}..{last} cannot hold {envelopes} dropped envelopes"
            " (need 1 <= first <= last and 1 <= envelopes_dropped <= last - first + 1)"
        )
    # Dropped envelopes held at most MAX_RECORDS_PER_ENVELOPE records each: a larger claim is not a loss, it is noise
    # aimed at the ledger's sums.
    records = _uint(item[K_RECORDS_DROPPED], "records_dropped", envelopes * MAX_RECORDS_PER_ENVELOPE)
    return LossNotice(
        timestamp=_timestamp(item),
        envelopes_dropped=envelopes,
        records_dropped=records,
        first_counter=first,
        last_counter=last,
        unsealed_records=unsealed,
    )


def _event_value(key: str, value: object) -> EventValue:
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise _fail(f"event data {key!r}", value, "a 64-bit signed integer")
        return value
    if type(value) is float:
        return _float(value, f"event data {key!r}")
    if type(value) in (str, bytes):
        if len(value) > _MAX_EVENT_VALUE:  # type: ignore[arg-type]
            raise _fail(f"event data {key!r}", value, f"at most {_MAX_EVENT_VALUE} characters or bytes")
        return value  # type: ignore[return-value]
    raise _fail(f"event data {key!r}", value, "a scalar (int, float, text, bytes, bool or null)")


def _event(item: Mapping[Any, Any]) -> EventRecord:
    _keys(item, _EVENT_KEYS, _EVENT_KEYS, "event")
    data = item[K_DATA]
    if type(data) is not dict or len(data) > _MAX_EVENT_ENTRIES:
        raise _fail("event data", data, f"a map of at most {_MAX_EVENT_ENTRIES} entries")
    checked = {}
    for k, v in data.items():
        checked[_text(k, "event data key", _MAX_EVENT_KEY)] = _event_value(k, v)
    return EventRecord(timestamp=_timestamp(item), kind=_ident(item[K_KIND], "event kind", _MAX_KIND), data=checked)


_DECODERS: dict[int, Callable[[Mapping[Any, Any]], TelemetryRecord]] = {
    TYPE_INFERENCE: _inference,
    TYPE_READING: _reading,
    TYPE_LOSS: _loss,
    TYPE_EVENT: _event,
}


# ------------------------------------------------------------------------------------------------------ item level


def record_from_item(item: object) -> TelemetryRecord:
    """Validate a decoded CBOR item and build the record it describes.

    Args:
        item: what the strict decoder returned for one record.

    Returns:
        The record.

    Raises:
        MalformedRecordError: not a map, unknown type, unknown or missing keys, wrong types or out-of-range values.
    """
    if type(item) is not dict:
        raise _fail("record", item, "a map")
    for key in item:
        # 1.0 and true are equal to 1 in Python and would pass every set check below: the type is checked here.
        if type(key) is not int:
            raise _fail("record key", key, "an integer")
    kind = item.get(K_TYPE)
    decode = _DECODERS.get(kind) if type(kind) is int else None
    if decode is None:
        raise _fail("record type (key 0)", item.get(K_TYPE), f"one of {sorted(_DECODERS)}")
    return decode(item)


def record_to_item(record: TelemetryRecord) -> dict[int, Any]:
    """The CBOR map of a record (before encoding).

    Args:
        record: the record.

    Returns:
        The map with integer keys.

    Raises:
        MalformedRecordError: a field cannot be represented (a SHA-256 that is not 64 hex digits, an unknown type).
    """
    if isinstance(record, InferenceRecord):
        try:
            model_sha, input_sha = bytes.fromhex(record.model_sha256), bytes.fromhex(record.input_sha256)
        except (ValueError, TypeError) as e:
            raise MalformedRecordError(f"inference record seq {record.seq}: SHA-256 is not hex") from e
        item: dict[int, Any] = {
            K_TYPE: TYPE_INFERENCE,
            K_TIMESTAMP: record.timestamp,
            K_SEQ: record.seq,
            K_MODEL_ID: record.model_id,
            K_MODEL_SHA256: model_sha,
            K_INPUT_SHA256: input_sha,
            K_PIXEL_FORMAT: record.pixel_format,
            K_TOP_K: [[c, s] for c, s in record.top_k],
            K_TIMINGS: [record.preprocess_us, record.inference_us, record.latency_us],
            K_BACKEND: record.backend,
        }
        if record.score is not None:
            item[K_SCORE] = record.score
        if record.label is not None:
            item[K_LABEL] = record.label
        return item
    if isinstance(record, ReadingRecord):
        return {K_TYPE: TYPE_READING, K_TIMESTAMP: record.timestamp, K_CHANNEL: record.channel, K_VALUE: record.value}
    if isinstance(record, LossNotice):
        return {
            K_TYPE: TYPE_LOSS,
            K_TIMESTAMP: record.timestamp,
            K_ENVELOPES_DROPPED: record.envelopes_dropped,
            K_RECORDS_DROPPED: record.records_dropped,
            K_FIRST_COUNTER: record.first_counter,
            K_LAST_COUNTER: record.last_counter,
        } | ({K_UNSEALED_RECORDS: record.unsealed_records} if record.unsealed_records else {})
    if isinstance(record, EventRecord):
        return {K_TYPE: TYPE_EVENT, K_TIMESTAMP: record.timestamp, K_KIND: record.kind, K_DATA: dict(record.data)}
    raise MalformedRecordError(f"not a telemetry record: {type(record).__name__}")


# ----------------------------------------------------------------------------------------------------- byte level


def encode_record(record: TelemetryRecord, limits: TelemetryLimits = DEFAULT_LIMITS) -> bytes:
    """Encode one record canonically, refusing what a verifier would reject.

    Args:
        record: the record.
        limits: ``max_record_bytes`` applies.

    Returns:
        The CBOR bytes.

    Raises:
        MalformedRecordError: the record violates the schema or is larger than ``limits.max_record_bytes``.
    """
    item = record_to_item(record)
    record_from_item(item)
    try:
        data = cbor2.dumps(item, canonical=True)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as e:
        raise MalformedRecordError(f"record cannot be encoded: {e}") from e
    if len(data) > limits.max_record_bytes:
        raise MalformedRecordError(f"record is {len(data)} bytes, limit {limits.max_record_bytes}")
    return data


def decode_record(data: bytes, limits: TelemetryLimits = DEFAULT_LIMITS) -> TelemetryRecord:
    """Decode and validate one record.

    Args:
        data: exactly one encoded record.
        limits: ``max_record_bytes`` (checked before decoding) and ``max_depth`` apply.

    Returns:
        The record.

    Raises:
        MalformedRecordError: oversized, not one well-formed strict CBOR item, too deep, or not a valid record.
    """
    if len(data) > limits.max_record_bytes:
        raise MalformedRecordError(f"record is {len(data)} bytes, limit {limits.max_record_bytes}")
    try:
        # A record sits two levels down in a payload (payload map, record array): the same absolute depth bound.
        item = loads_strict(data, limits.max_depth - 2)
    except DECODE_ERRORS as e:
        raise MalformedRecordError(f"record is not valid CBOR: {e}") from e
    return record_from_item(item)


def encode_records(records: Sequence[TelemetryRecord], limits: TelemetryLimits = DEFAULT_LIMITS) -> bytes:
    """Encode records as one CBOR array (the form they take in an envelope payload).

    Args:
        records: at most ``limits.max_records``.
        limits: the limits.

    Returns:
        The CBOR array bytes.

    Raises:
        MalformedRecordError: too many records, or one fails ``encode_record``.
    """
    if len(records) > limits.max_records:
        raise MalformedRecordError(f"{len(records)} records, limit {limits.max_records}")
    # An array head followed by the canonical encodings: the same bytes cbor2 would produce for the list.
    return _array_head(len(records)) + b"".join(encode_record(r, limits) for r in records)


def _array_head(n: int) -> bytes:
    head = cbor2.dumps(n)
    return bytes([head[0] | 0x80]) + head[1:]  # major type 0 (uint) -> 4 (array), same argument


def read_record_array(fp: io.BytesIO, limits: TelemetryLimits) -> list[TelemetryRecord]:
    """Decode a CBOR array of records from ``fp``, checking the count before decoding any record.

    Args:
        fp: positioned on the array head.
        limits: the limits; a record map counts as depth 3 (payload map, record array, record) wherever it is.

    Returns:
        The records.

    Raises:
        MalformedRecordError: not an array, too many records, a record oversized, too deep or invalid.
    """
    try:
        major, count = read_head(fp)
    except DECODE_ERRORS as e:
        raise MalformedRecordError(f"records: {e}") from e
    if major != 4:
        raise MalformedRecordError(f"records: CBOR major type {major}, expected an array (4)")
    if count > limits.max_records:
        raise MalformedRecordError(f"{count} records, limit {limits.max_records}")
    decoder = new_decoder(fp, limits.max_depth - 2)
    out = []
    for i in range(count):
        start = fp.tell()
        try:
            item = decoder.decode()
        except DECODE_ERRORS as e:
            raise MalformedRecordError(f"record {i}: not valid CBOR: {e}") from e
        # The whole payload is already bounded; this bound keeps a single record within what the schema allows.
        if fp.tell() - start > limits.max_record_bytes:
            raise MalformedRecordError(f"record {i} is {fp.tell() - start} bytes, limit {limits.max_record_bytes}")
        try:
            out.append(record_from_item(item))
        except MalformedRecordError as e:
            raise MalformedRecordError(f"record {i}: {e}") from e
    return out


def decode_records(data: bytes, limits: TelemetryLimits = DEFAULT_LIMITS) -> list[TelemetryRecord]:
    """Decode and validate a CBOR array of records (as ``encode_records`` makes).

    Args:
        data: the array bytes.
        limits: ``max_envelope_bytes`` bounds ``data`` (checked first); the other limits apply as in an envelope.

    Returns:
        The records.

    Raises:
        MalformedRecordError: oversized, malformed, too many or invalid records, or trailing bytes.
    """
    if len(data) > limits.max_envelope_bytes:
        raise MalformedRecordError(f"records are {len(data)} bytes, limit {limits.max_envelope_bytes}")
    fp = io.BytesIO(data)
    records = read_record_array(fp, limits)
    if fp.tell() != len(data):
        raise MalformedRecordError(f"{len(data) - fp.tell()} trailing bytes after the records")
    return records
