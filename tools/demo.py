"""`make demo`: run the real service (`edge run`) on the bundled digits model over the held-out test frames,
delivered as YUYV camera frames, and print what it did: accuracy, the preprocessing backend, latency percentiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.sensing.synthetic import digits_test_set  # noqa: E402


def main() -> int:
    digits, _labels, _seed = digits_test_set()
    count = len(digits)
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        records_path = Path(tmp) / "records.jsonl"
        config = Path(tmp) / "edge.toml"
        config.write_text(
            f"""
[device]
id = "demo-box"
data_dir = "{tmp}"

[source]
kind = "synthetic"
pixel_format = "YUYV"
count = {count}
fps = 100

[sink]
path = "{records_path}"

[log]
format = "text"
""",
            encoding="utf-8",
        )
        print(
            f"demo: edge run on the bundled digits model, {count} held-out frames as 160x120 YUYV at 100 fps\n",
            flush=True,
        )
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "edge", "run", "--config", str(config)],
            cwd=ROOT,
            env={**os.environ},
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        wall = time.monotonic() - t0
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            print(f"demo: edge run failed with status {proc.returncode}", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in records_path.read_text(encoding="utf-8").splitlines()]

    inferences = [r for r in records if r["type"] == "inference"]
    if len(inferences) != count:
        print(f"demo: expected {count} records, got {len(inferences)}", file=sys.stderr)
        return 1
    correct = sum(r["top_k"][0][0] == r["label"] for r in inferences)
    latency = np.array([r["timing_us"]["latency"] for r in inferences], dtype=np.float64)
    pre = np.array([r["timing_us"]["preprocess"] for r in inferences], dtype=np.float64)
    inf = np.array([r["timing_us"]["inference"] for r in inferences], dtype=np.float64)
    backends = sorted({r["backend"] for r in inferences})
    print("\n=== edge demo summary ===")
    print(f"model            {inferences[0]['model']}  sha256 {inferences[0]['model_sha256'][:16]}...")
    print(f"backend          {', '.join(backends)}")
    print(f"frames           {len(inferences)} (YUYV 160x120)")
    print(f"accuracy         {correct / len(inferences):.2%} against the held-out labels")
    print(f"preprocess       p50 {np.percentile(pre, 50):.0f} us   p99 {np.percentile(pre, 99):.0f} us")
    print(f"inference        p50 {np.percentile(inf, 50):.0f} us   p99 {np.percentile(inf, 99):.0f} us")
    print(f"latency (e2e)    p50 {np.percentile(latency, 50):.0f} us   p99 {np.percentile(latency, 99):.0f} us")
    print(f"wall time        {wall:.2f} s including start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
