"""On the box, for the oeqa test ``edge.EdgeServiceTest.test_edge_telemetry_envelope_produced``.

Creates a device identity with ``edge keys generate``, a self-signed certificate for it, and a configuration whose
sink is signed telemetry to a broker that is not there (port 9 on the loopback: nothing listens). ``edge run`` then
infers FRAMES frames, seals them into envelopes and keeps them in its outbox, as a box does while its network is
down. The check opens the outbox and verifies every envelope: the signature with the device's public key, counters
1..n without a gap, each ``prev`` the hash of the envelope before, and exactly FRAMES inference records in all.

Usage: ``python3 telemetry_check.py [WORKDIR]`` (a fresh temporary directory by default). Prints one JSON object
and exits 0, or prints the reason and exits 1. Everything it writes stays in WORKDIR.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from edge.identity import load_private_key
from edge.telemetry.outbox import Outbox
from edge.wire.envelope import GENESIS_PREV, open_envelope
from edge.wire.records import InferenceRecord
from edge.wire.schema import DEFAULT_LIMITS

DEVICE_ID = "oeqa-box"
FRAMES = 20
MODEL = "/usr/share/edge/models/digits-int8.onnx"
TIMEOUT_S = 600  # an emulated board imports numpy and onnxruntime slowly


def fail(reason: str) -> None:
    print(f"telemetry_check: {reason}", file=sys.stderr)
    sys.exit(1)


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if proc.returncode != 0:
        fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_certificate(keys: Path) -> None:
    """A self-signed certificate for the device key; it is also the "fleet CA", so TLS settings load."""
    key = load_private_key(keys / "device.key")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)  # Ed25519 signs without a separate hash algorithm
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (keys / "device.pem").write_bytes(pem)
    (keys / "fleet-ca.pem").write_bytes(pem)


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edge-oeqa-"))
    work.mkdir(parents=True, exist_ok=True)
    edge = shutil.which("edge")
    if edge is None:
        fail("the edge command is not on PATH")
    keys = work / "keys"
    run([edge, "keys", "generate", "--dir", str(keys), "--device-id", DEVICE_ID])
    write_certificate(keys)
    config = work / "edge.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE_ID}"\ndata_dir = "{work}"\n'
        f'[model]\npath = "{MODEL}"\n'
        f'[source]\nkind = "synthetic"\ncount = {FRAMES}\n'
        '[sink]\nkind = "telemetry"\n'
        '[telemetry]\nhost = "127.0.0.1"\nport = 9\nbatch_records = 5\nbatch_age_s = 0.5\ndrain_timeout_s = 0.5\n',
        encoding="utf-8",
    )
    run([edge, "run", "--config", str(config), "--frames", str(FRAMES)])

    key = load_private_key(keys / "device.key")
    outbox = Outbox(work / "outbox.sqlite", device_id=DEVICE_ID, key=key, limits=DEFAULT_LIMITS)
    try:
        pending = outbox.pending()
    finally:
        outbox.close()
    if not pending:
        fail("the outbox holds no envelope")
    prev = GENESIS_PREV
    records = 0
    for expected, (counter, data) in enumerate(pending, start=1):
        envelope = open_envelope(data, key.public_key())  # raises on a bad signature or a malformed envelope
        if counter != expected or envelope.counter != expected:
            fail(f"envelope {expected} has counter {counter} (row) / {envelope.counter} (signed)")
        if envelope.prev != prev:
            fail(f"envelope {expected} does not chain to the one before it")
        if envelope.device_id != DEVICE_ID:
            fail(f"envelope {expected} names device {envelope.device_id!r}")
        records += sum(isinstance(r, InferenceRecord) for r in envelope.records)
        prev = envelope.hash
    if records != FRAMES:
        fail(f"{records} inference records in the envelopes, {FRAMES} frames were inferred")
    print(json.dumps({"envelopes": len(pending), "inference_records": records, "device": DEVICE_ID}))


if __name__ == "__main__":
    main()
