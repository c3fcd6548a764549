"""Signed telemetry: the record schema, COSE_Sign1 envelopes chained per device, batching, and the verifier.

Everything here is sans-IO: bytes and an explicit ``now`` in, values or typed errors out. The wire format is
specified in docs/telemetry.md.
"""

from __future__ import annotations

from edge.telemetry.envelope import GENESIS_PREV, Batcher, Envelope, envelope_hash, open_envelope, seal_envelope
from edge.telemetry.errors import (
    BadSignatureError,
    MalformedEnvelopeError,
    MalformedRecordError,
    UnsupportedAlgorithmError,
)
from edge.telemetry.schema import (
    DEFAULT_LIMITS,
    EventRecord,
    LossNotice,
    TelemetryLimits,
    TelemetryRecord,
    decode_record,
    decode_records,
    encode_record,
    encode_records,
)
from edge.telemetry.verify import (
    ChainLink,
    ChainStateStore,
    ChainVerifier,
    KeyLookup,
    MemoryChainState,
    Verdict,
    VerdictKind,
)

__all__ = [
    "DEFAULT_LIMITS",
    "GENESIS_PREV",
    "BadSignatureError",
    "Batcher",
    "ChainLink",
    "ChainStateStore",
    "ChainVerifier",
    "Envelope",
    "EventRecord",
    "KeyLookup",
    "LossNotice",
    "MalformedEnvelopeError",
    "MalformedRecordError",
    "MemoryChainState",
    "TelemetryLimits",
    "TelemetryRecord",
    "UnsupportedAlgorithmError",
    "Verdict",
    "VerdictKind",
    "decode_record",
    "decode_records",
    "encode_record",
    "encode_records",
    "envelope_hash",
    "open_envelope",
    "seal_envelope",
]
