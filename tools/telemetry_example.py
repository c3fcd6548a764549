"""Print the worked examples of docs/telemetry.md: a deterministic envelope and a receipt (Ed25519 signatures are
deterministic).

Run from the repository root: ``PYTHONPATH=. python tools/telemetry_example.py [--receipt]``.
tests/test_envelope.py and tests/test_receipts.py check that the document shows this output.
"""

from __future__ import annotations

import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope
from edge.wire.receipts import Receipt, sign_receipt
from edge.wire.records import InferenceRecord, ReadingRecord

# RFC 8032 section 7.1 TEST 1 secret key: public, never a device key.
EXAMPLE_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")


def example_envelope() -> bytes:
    """The example envelope: device ``box-1``, counter 1, one inference and one reading."""
    key = Ed25519PrivateKey.from_private_bytes(EXAMPLE_SEED)
    records = [
        InferenceRecord(
            seq=7,
            timestamp=1700000000.5,
            model_id="digits@1",
            model_sha256="11" * 32,
            input_sha256="22" * 32,
            pixel_format="GRAY8",
            top_k=((3, 0.75), (8, 0.125)),
            score=None,
            label=3,
            preprocess_us=120,
            inference_us=340,
            latency_us=900,
            backend="neon",
        ),
        ReadingRecord(channel=2, value=21.5, timestamp=1700000001.0),
    ]
    return seal_envelope("box-1", 1, GENESIS_PREV, records, 1700000002.0, key)


def example_receipt() -> bytes:
    """The example receipt for ``box-1``, signed with the same public test key standing in for the fleet's: every
    envelope up to 41 stored, the highest stored is 45, 43 is missing (a hole)."""
    key = Ed25519PrivateKey.from_private_bytes(EXAMPLE_SEED)
    receipt = Receipt(
        device_id="box-1",
        stored=41,
        stored_hash=bytes([0x41]) * 32,
        head=45,
        head_hash=bytes([0x45]) * 32,
        start=41,
        holes=((43, 43),),
        issued=1700000100.0,
        gateway="gateway-1",
    )
    return sign_receipt(receipt, key)


def main() -> None:
    """Print the envelope (or, with ``--receipt``, the receipt) as hex, 64 digits a line, and the envelope's hash."""
    if "--receipt" in sys.argv[1:]:
        h = example_receipt().hex()
        for i in range(0, len(h), 64):
            print(h[i : i + 64])
        return
    data = example_envelope()
    h = data.hex()
    for i in range(0, len(h), 64):
        print(h[i : i + 64])
    print(f"sha256: {envelope_hash(data).hex()}")


if __name__ == "__main__":
    main()
