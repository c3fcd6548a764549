"""The contract between a box and its fleet: what goes over the wire and how either side checks it.

Everything here is sans-IO (bytes and an explicit ``now`` in, values or typed errors out) and imports neither the
box (``edge.telemetry``, ``edge.ota``, ...) nor the fleet (``edge.fleet``): tests/test_architecture.py checks that.

- ``_cbor``, ``cose``: strict CBOR and the COSE_Sign1 profile (EdDSA) every signed message uses;
- ``records``, ``schema``: the records a box emits and their CBOR schema under ``TelemetryLimits``;
- ``envelope``: signed, hash-chained envelopes of records; ``chain``: the verifier of a device's chain;
- ``commands``: the fleet's signed commands, their signer and the box's verifier;
- ``topics``: every MQTT topic, built and parsed once; ``manifest``: the model release manifest;
- ``_bounds``: limits shared by all of them; ``errors``: the malformed-input errors.

The formats are specified in docs/telemetry.md, docs/commands.md and docs/ota.md.
"""

from __future__ import annotations

from edge.wire.chain import (
    ChainLink,
    ChainStateStore,
    ChainVerifier,
    KeyLookup,
    MemoryChainState,
    Verdict,
    VerdictKind,
)
from edge.wire.envelope import GENESIS_PREV, Batcher, Envelope, envelope_hash, open_envelope, seal_envelope
from edge.wire.errors import (
    BadSignatureError,
    MalformedEnvelopeError,
    MalformedRecordError,
    UnsupportedAlgorithmError,
)
from edge.wire.schema import (
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
