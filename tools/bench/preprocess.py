"""Benchmark edge's preprocessing against OpenCV pipelines and the memory floor (single thread, medians).

    python tools/bench/preprocess.py [--json] [--reps N]
    python tools/bench/preprocess.py --quick      # a few seconds, no figures worth quoting: make test runs it

Per scenario (a 480x640 frame to a 1x3x224x224 tensor) it times, side by side in one process:
- native: ``preprocess_image`` on the selected backend (``out=`` preallocated, as the service calls it);
- numpy: the pure numpy twin;
- OpenCV ``blobFromImageWithParams`` and ``resize`` + ``split`` + 3x ``LUT`` into the NCHW planes (a float LUT
  folding mean/std, or an int8 LUT for the int8 scenario); for YUV inputs each is preceded by ``cvtColor``;
- the memory floor: ``np.copyto`` of a frame-sized and of an output-sized buffer (the bytes read + written).
The ratio is native / fastest OpenCV pipeline, against the target (PASS/MISS). Each OpenCV output is checked to be
the same result as ours (within about a pixel unit, OpenCV rounds to uint8 in between) so the comparison is fair: a
larger difference ends the run with an error, in quick mode too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Single-threaded for every contender: OpenBLAS worker threads (started by numpy) would otherwise spin beside us.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edge.inference import preprocess as pp

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
H, W, OUT = 480, 640, 224
SCALE, ZP = 0.0186, -14  # a typical int8 input quantisation of an ImageNet-normalised model
# Pixel units (float32) or LSB (int8): half a unit from each of OpenCV's two uint8 roundings (colour conversion or
# resize, then the LUT's input) plus its fixed-point coordinates; a wrong pipeline differs by tens.
MAX_DIFF = 2.0
QUICK_REPS = 20


def median_us(fn: Callable[[], Any], reps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def frames(rng: np.random.Generator) -> dict[str, np.ndarray[Any, Any]]:
    # A smooth image with noise rather than pure noise; YUV in video range (OpenCV clamps Y below 16, we do not).
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([(xx * 255 // W), (yy * 255 // H), ((xx + yy) * 255 // (H + W))], axis=-1)
    rgb = np.clip(base + rng.integers(-30, 31, (H, W, 3)), 0, 255).astype(np.uint8)
    yuyv = rng.integers(16, 236, (H, W, 2), dtype=np.uint8)
    nv12 = rng.integers(16, 236, (H * 3 // 2, W), dtype=np.uint8)
    return {"RGB888": rgb, "YUYV": yuyv, "NV12": nv12}


def opencv_pipelines(
    src: np.ndarray[Any, Any], fmt: str, dtype: str, out: np.ndarray[Any, Any]
) -> dict[str, Callable[[], np.ndarray[Any, Any]]]:
    conv = {"YUYV": cv2.COLOR_YUV2RGB_YUYV, "NV12": cv2.COLOR_YUV2RGB_NV12}.get(fmt)

    def rgb() -> np.ndarray[Any, Any]:
        return src if conv is None else cv2.cvtColor(src, conv)

    if dtype == "float32":
        luts = [((np.arange(256) - MEAN[c]) / STD[c]).astype(np.float32) for c in range(3)]
    else:
        luts = [
            np.clip(np.rint((np.arange(256) - MEAN[c]) / STD[c] / SCALE) + ZP, -128, 127).astype(np.int8)
            for c in range(3)
        ]

    def resize_split_lut() -> np.ndarray[Any, Any]:
        small = cv2.resize(rgb(), (OUT, OUT), interpolation=cv2.INTER_LINEAR)
        for c, plane in enumerate(cv2.split(small)):
            cv2.LUT(plane, luts[c], dst=out[0, c])
        return out

    pipes: dict[str, Callable[[], np.ndarray[Any, Any]]] = {}
    if dtype == "float32":
        params = cv2.dnn.Image2BlobParams()
        params.scalefactor = (1 / STD[0], 1 / STD[1], 1 / STD[2], 0.0)
        params.mean = (*MEAN, 0.0)
        params.size = (OUT, OUT)
        params.ddepth = cv2.CV_32F
        params.swapRB = False

        def blob() -> np.ndarray[Any, Any]:
            return np.asarray(cv2.dnn.blobFromImageWithParams(rgb(), params))

        pipes["opencv blobFromImageWithParams"] = blob
    pipes["opencv resize+split+LUT"] = resize_split_lut
    if conv is not None:
        pipes = {k.replace("opencv ", "opencv cvtColor+"): v for k, v in pipes.items()}
    return pipes


def run(reps: int) -> list[dict[str, Any]]:
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    fr = frames(rng)
    scenarios = [
        ("RGB888 -> f32 NCHW 224 ImageNet", "RGB888", "float32", 0.5),
        ("RGB888 -> int8 NCHW 224 (scale/zp)", "RGB888", "int8", 0.5),
        ("YUYV -> f32 NCHW 224 ImageNet", "YUYV", "float32", 0.35),
        ("NV12 -> f32 NCHW 224 ImageNet", "NV12", "float32", 0.35),
    ]
    results = []
    for title, fmt, dtype, target in scenarios:
        src = fr[fmt]
        np_dtype = np.float32 if dtype == "float32" else np.int8
        out = np.empty((1, 3, OUT, OUT), dtype=np_dtype)
        quant: dict[str, Any] = {} if dtype == "float32" else {"scale": SCALE, "zero_point": ZP}
        kw: dict[str, Any] = dict(pixel_format=fmt, size=(OUT, OUT), mean=MEAN, std=STD, dtype=dtype, **quant)
        ours = pp.preprocess_image(src, **kw).copy()
        rows: dict[str, float] = {}
        rows[f"edge {pp.backend()}"] = median_us(
            lambda src=src, kw=kw, out=out: pp.preprocess_image(src, out=out, **kw), reps
        )
        rows["edge numpy twin"] = median_us(
            lambda src=src, kw=kw: pp.preprocess_image(src, backend="numpy", **kw), max(5, reps // 50), 2
        )
        cv_out = np.empty_like(out)
        best = float("inf")
        agree = {}
        for name, fn in opencv_pipelines(src, fmt, dtype, cv_out).items():
            res = np.asarray(fn(), dtype=np.float64).reshape(ours.shape)
            diff = np.abs(res - ours.astype(np.float64))
            # In pixel units for float32 (undo the std), in LSB for int8.
            err = float((diff * np.asarray(STD)[None, :, None, None]).max() if dtype == "float32" else diff.max())
            if not err <= MAX_DIFF:
                raise RuntimeError(
                    f"{title}: {name} differs from edge by {err:.2f} (at most {MAX_DIFF}): not comparable"
                )
            agree[name] = err
            t = median_us(fn, reps)
            rows[name] = t
            best = min(best, t)
        bufs = (np.empty_like(src), np.ascontiguousarray(src), np.empty_like(out), np.empty_like(out))

        def floor(b: tuple[np.ndarray[Any, Any], ...] = bufs) -> None:
            np.copyto(b[0], b[1])
            np.copyto(b[2], b[3])

        rows["memory floor (copy frame + output)"] = median_us(floor, reps)
        native = rows[f"edge {pp.backend()}"]
        results.append(
            {
                "scenario": title,
                "timings_us": rows,
                "opencv_max_diff": agree,
                "ratio_vs_best_opencv": native / best,
                "target": target,
                "pass": native / best <= target,
            }
        )
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--reps", type=int, default=500, help="repetitions per measurement (median)")
    ap.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REPS} repetitions: only proves the benchmark runs (make test)"
    )
    args = ap.parse_args()
    if args.quick:
        args.reps = QUICK_REPS
    results = run(args.reps)
    if args.quick:
        for r in results:
            del r["pass"]  # no verdict on figures from a handful of repetitions
    if args.json:
        print(json.dumps({"backend": pp.backend(), "quick": args.quick, "results": results}, indent=2))
        return 0
    print(f"backend {pp.backend()}; available {pp.available_backends()}; OpenCV {cv2.__version__}, 1 thread")
    if args.quick:
        print(
            f"quick: {args.reps} repetitions per measurement, a check that it runs; the figures are not worth quoting"
        )
    for r in results:
        print(f"\n{r['scenario']}")
        for name, t in r["timings_us"].items():
            diff = r["opencv_max_diff"].get(name)
            note = (
                f"   (max diff vs edge {diff:.2f} {'px' if 'f32' in r['scenario'] else 'LSB'})"
                if diff is not None
                else ""
            )
            print(f"  {name:<44} {t:9.1f} us{note}")
        verdict = "(quick: no verdict)" if args.quick else "PASS" if r["pass"] else "MISS"
        print(f"  ratio edge / best OpenCV: {r['ratio_vs_best_opencv']:.2f} (target <= {r['target']}) {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
