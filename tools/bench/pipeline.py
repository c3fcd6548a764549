"""Benchmark of `edge run`'s pipeline against its own parts, measured side by side in one run.

Prints, for the bundled digits model and the MobileNetV2-shaped int8 model:
- steady-state time per frame of the pipeline (three stages, bounded queues, records to a JSON-lines sink),
- the same frames through `preprocess_image` + `Model.run` alone in one loop (the floor),
- their ratio (target: at most 1.10x),
and for the service process with the MobileNetV2-shaped int8 model, over 3 runs: the largest peak RSS (target
110 MB) and the median time from process start to its first record (target 1 s).

Usage: python tools/bench/pipeline.py [--frames N] [--repeats R] [--json]
       python tools/bench/pipeline.py --quick   # a few seconds, no figures worth quoting: make test runs it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge.inference.model import Model  # noqa: E402
from edge.inference.preprocess import backend, preprocess_image  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.sensing.frames import PixelFormat  # noqa: E402
from edge.sensing.sources import ArraySource  # noqa: E402
from edge.sensing.synthetic import render_test_frames  # noqa: E402
from edge.sinks import JsonLinesSink  # noqa: E402

CACHE = ROOT / ".cache" / "bench-models"
QUICK = "quick: no verdict"


def mobilenet_int8() -> Path:
    """The MobileNetV2-shaped int8 model, generated once into the cache (not committed: 14 MB of random weights)."""
    path = CACHE / "mobilenetv2-int8.onnx"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "tools/models/make_mobilenetv2.py"), str(CACHE)], check=True)
    return path


def floor_per_frame(model: Model, frames: list[np.ndarray], fmt: PixelFormat, n: int) -> float:
    """Seconds per frame of preprocess + run alone, in one tight loop."""
    kw = model.preprocess_kwargs()
    buf = model.new_input()
    run = model.run
    t0 = time.perf_counter()
    for i in range(n):
        preprocess_image(frames[i % len(frames)], pixel_format=fmt, out=buf, **kw)
        run(buf)
    return (time.perf_counter() - t0) / n


def pipeline_per_frame(model: Model, frames: list[np.ndarray], fmt: PixelFormat, n: int) -> float:
    """Seconds per frame of the full pipeline in steady state."""
    sink = JsonLinesSink(os.devnull)
    p = Pipeline(ArraySource(frames, fmt, count=n), model, sink)
    t0 = time.perf_counter()
    stats = p.run()
    elapsed = time.perf_counter() - t0
    sink.close()
    assert stats.inferences == n, stats
    return elapsed / n


def compare(
    name: str, model: Model, frames: list[np.ndarray], fmt: PixelFormat, n: int, repeats: int, quick: bool
) -> dict[str, float]:
    floor_per_frame(model, frames, fmt, max(10, n // 10))  # warm caches
    floors, pipes = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        floors.append(floor_per_frame(model, frames, fmt, n))
        pipes.append(pipeline_per_frame(model, frames, fmt, n))
    f, p = statistics.median(floors), statistics.median(pipes)
    ratio = p / f
    verdict = QUICK if quick else f"target <= 1.10x: {'PASS' if ratio <= 1.10 else 'MISS'}"
    print(
        f"{name:28} floor {f * 1e6:8.1f} us/frame   pipeline {p * 1e6:8.1f} us/frame   ratio {ratio:5.2f}x  ({verdict})"
    )
    return {"floor_us": f * 1e6, "pipeline_us": p * 1e6, "ratio": ratio}


def service_footprint(model_path: Path, frames: int) -> dict[str, float]:
    """Peak RSS and time to the first record of a real `edge run` process on the given model."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "edge.toml"
        cfg.write_text(
            f'[model]\npath = "{model_path}"\n[source]\nkind = "synthetic"\npixel_format = "YUYV"\ncount = {frames}\n'
            f'[sink]\npath = "-"\n[log]\nlevel = "warning"\n',
            encoding="utf-8",
        )
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        first_s = time.perf_counter() - t0
        assert first.startswith("{"), first
        for _ in proc.stdout:
            pass
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, proc.returncode
    rss_mb = usage.ru_maxrss / 1024  # Linux reports KiB
    return {"first_record_s": first_s, "peak_rss_mb": rss_mb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3000, help="frames per measurement on the digits model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="a small workload that only proves the benchmark runs (make test)"
    )
    args = ap.parse_args()
    # Quick: every measurement on a few frames, the service started once on a short stream; no verdicts.
    if args.quick:
        args.frames, args.repeats = 200, 2
    n_big = 10 if args.quick else max(50, args.frames // 20)
    service_runs, service_frames = (1, 20) if args.quick else (3, 200)
    print(f"preprocessing backend: {backend()}; cpus: {os.cpu_count()}; model threads: 1")
    if args.quick:
        print(
            f"quick: {args.frames} and {n_big} frames, {args.repeats} repeats, {service_runs} service run of "
            f"{service_frames} frames; a check that it runs, the figures are not worth quoting"
        )
    results: dict[str, dict[str, float]] = {}

    digits = Model(ROOT / "edge/models/digits-int8.onnx")
    frames = [f for f, _ in render_test_frames(PixelFormat.YUYV, count=64)]
    results["digits-int8"] = compare(
        "digits int8, YUYV 160x120", digits, frames, PixelFormat.YUYV, args.frames, args.repeats, args.quick
    )

    mnet_path = mobilenet_int8()
    mnet = Model(mnet_path)
    rng = np.random.default_rng(0)
    big = [rng.integers(0, 256, size=(480, 640, 2), dtype=np.uint8) for _ in range(8)]
    results["mobilenetv2-int8"] = compare(
        "mobilenetv2 int8, YUYV 640x480", mnet, big, PixelFormat.YUYV, n_big, args.repeats, args.quick
    )

    runs = [service_footprint(mnet_path, service_frames) for _ in range(service_runs)]
    fp = {
        "first_record_s": statistics.median(r["first_record_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    results["service"] = fp
    rss_verdict = QUICK if args.quick else f"target <= 110: {'PASS' if fp['peak_rss_mb'] <= 110 else 'MISS'}"
    first_verdict = QUICK if args.quick else f"target <= 1.0: {'PASS' if fp['first_record_s'] <= 1.0 else 'MISS'}"
    print(
        f"service (mobilenetv2 int8)   peak RSS {fp['peak_rss_mb']:6.1f} MB ({rss_verdict})   "
        f"start to first record {fp['first_record_s']:.2f} s ({first_verdict})"
    )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
