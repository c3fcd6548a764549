"""A sealer and publisher in one loop, for the kill -9 test: ``python tests/outbox_writer.py PATH KEYFILE``.

KEYFILE holds the raw 32-byte Ed25519 private key. Output, one line each, flushed only after the step it reports:

- ``ready`` once the outbox is open;
- ``sealed COUNTER HASH [FIRST LAST]`` after the commit that sealed it (with the range of its loss notice, if any);
- ``acking C[:FIRST-LAST] ...`` before an ack (each with the range of the loss notice it carries), then
  ``acked C ...`` after the ack committed.

It runs until it is killed. Only what the loop needs is imported: start-up time dominates the test.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.telemetry.outbox import Outbox
from edge.wire.envelope import open_envelope
from edge.wire.records import ReadingRecord
from edge.wire.schema import LossNotice, TelemetryLimits

DEVICE_ID = "crash-box"
MAX_ENVELOPES = 30  # small, so the backlog overflows across runs and drops (and their notices) are crash points too
LIMITS = TelemetryLimits()


def _range(notice: LossNotice | None) -> str:
    return "" if notice is None else f"{notice.first_counter} {notice.last_counter}"


def main(path: str, keyfile: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(Path(keyfile).read_bytes())
    public = key.public_key()
    rng = random.Random()
    outbox = Outbox(path, device_id=DEVICE_ID, key=key, limits=LIMITS, max_envelopes=MAX_ENVELOPES)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    seq = 0
    while True:
        batches = []
        for _ in range(rng.randint(1, 4)):
            batches.append([ReadingRecord(seq + i, float(i), 1_700_000_000.0 + seq) for i in range(rng.randint(1, 20))])
            seq += 100
        for s in outbox.seal_many(batches):
            out.write(f"sealed {s.counter} {s.hash.hex()} {_range(s.loss)}\n")
        out.flush()
        if rng.random() < 0.5:
            rows = outbox.pending(limit=rng.randint(1, 8))
            tags = []
            for counter, data in rows:
                first = open_envelope(data, public, LIMITS).records[:1]
                notice = first[0] if first and isinstance(first[0], LossNotice) else None
                tags.append(
                    f"{counter}" if notice is None else f"{counter}:{notice.first_counter}-{notice.last_counter}"
                )
            out.write(f"acking {' '.join(tags)}\n")
            out.flush()
            outbox.ack(c for c, _ in rows)
            out.write(f"acked {' '.join(str(c) for c, _ in rows)}\n")
            out.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
