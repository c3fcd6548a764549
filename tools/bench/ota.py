"""End-to-end OTA update of the MobileNetV2-shaped fp32 model against a plain download + SHA-256, in one run.

Everything is real: a fleet TUF repository (``FleetRepository``) with a delegated publisher signing the release, its
files served by the test suite's ``StaticServer`` on 127.0.0.1, and a box (``edge.ota.updater.Updater`` over the real
``TrustClient``, the factory model ``edge/models/digits-int8.onnx``, a fresh data directory per run) installing
``mobilenetv2-bench@1.0.0`` (about 14 MB fp32, published as quantization "float" with golden samples whose outputs
``publish`` computes, no latency budget). Each update is timed from the ``update()`` call to its return, which must
be ``committed``.

The baseline, from the same server in the same run: a plain HTTP GET of the same target file (http.client, streamed
to a file in a temp directory) plus the SHA-256 of that file read back from disk, timed together.

Runs alternate baseline / update (so drift on a shared machine hits both alike) after one untimed warm-up of each;
the table gives medians, the ratio update/baseline against the target of issue 5 (at most 2.0x), the phase
breakdown (``Outcome.timings``, and the TUF client's calls timed by a pass-through wrapper) and the trial's share.
When the ratio misses, a second section takes the update apart on the same file: each pass the model fetch makes
over the bytes (GET, fsync, hash, copy), and the trial's parts (session creation and one inference per graph
optimisation level, ``run_trial`` with its default 20 timed runs against 5). ``--link-mbit`` adds pairs over a link
paced by the server (``StaticServer.throttle``), where the transfer rather than the box dominates.

``--quick`` proves the benchmark runs (``make test``): one pair after the warm-up, one golden sample, and every
section whatever the ratio (the dissection with fewer repetitions, a paced link at 2 Gbit/s unless ``--link-mbit``
says otherwise); no verdicts.

    python tools/bench/ota.py [--runs N] [--golden K] [--link-mbit MBIT] [--no-dissect] [--json]
    python tools/bench/ota.py --quick   # a few seconds, no figures worth quoting: make test runs it
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "ota"))  # the repository, box and server helpers are reused, not copied

from box_helpers import FACTORY, trust_client, utc_now  # noqa: E402
from repo_helpers import make_publisher_key  # noqa: E402
from static_server import StaticServer  # noqa: E402

from edge.fleet.models.repository import FleetRepository  # noqa: E402
from edge.inference.model import Model  # noqa: E402
from edge.ota.slots import file_sha256  # noqa: E402
from edge.ota.trial import load_golden, run_trial  # noqa: E402
from edge.ota.trust import TrustClient  # noqa: E402
from edge.ota.updater import Outcome, Updater  # noqa: E402
from edge.wire.manifest import GoldenSamples, ModelManifest  # noqa: E402

CACHE = ROOT / ".cache" / "bench-models"
NAME = "mobilenetv2-bench"  # the edge.name written by tools/models/make_mobilenetv2.py
VERSION = "1.0.0"  # its edge.version
PUBLISHER = "bench"
TARGET_RATIO = 2.0
TRIAL_RUNS = 20  # run_trial's default number of timed inferences (the updater does not override it)
BEFORE = "before start (lock, state, factory id)"
WARMUP_RUNS = 3  # Model's default warm-up inferences at load
CHUNK = 256 * 1024  # the box fetcher's chunk size
QUICK_LINK_MBIT = 2000.0  # quick mode's paced link: the pacing code runs, the time stays small


def mobilenet_fp32() -> Path:
    """The MobileNetV2-shaped fp32 model, generated once into the cache (not committed: 14 MB of random weights)."""
    path = CACHE / "mobilenetv2-fp32.onnx"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "tools/models/make_mobilenetv2.py"), str(CACHE)], check=True)
    return path


# -- the fleet side ------------------------------------------------------------------------------------------------


def make_fleet(fleet_dir: Path, model: Path, golden_count: int) -> tuple[FleetRepository, ModelManifest, Path]:
    """A repository with publisher ``bench`` allowed ``mobilenetv2-bench`` and its fp32 release published.

    Returns:
        The repository, the published manifest and the served path of the model file.
    """
    now = utc_now()  # the box checks expiry against the wall clock
    repo = FleetRepository.init(fleet_dir, now=now)
    work = fleet_dir / "work"
    key, _pub = make_publisher_key(work, PUBLISHER)
    repo.add_publisher(PUBLISHER, key.public_key(), [NAME], now=now)
    # Inputs only: publish computes the expected outputs with the primary model, as an operator's release would.
    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((golden_count, 3, 224, 224)).astype(np.float32)
    golden = work / "golden.npz"
    with golden.open("wb") as f:
        np.savez(f, inputs=inputs)
    manifest = repo.publish(
        model,
        name=NAME,
        version=VERSION,
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=golden,
        quantization="float",
    )
    # Consistent snapshot: the served name is <sha256>.model.onnx under the release directory.
    served = repo.targets_dir / NAME / VERSION / f"{manifest.sha256}.model.onnx"
    assert served.is_file(), served
    return repo, manifest, served


# -- the baseline --------------------------------------------------------------------------------------------------


def baseline_once(port: int, url_path: str, dest: Path) -> float:
    """Seconds for a plain GET of ``url_path`` streamed to ``dest``, plus the SHA-256 of ``dest`` read back."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", url_path)
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        with dest.open("wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
    finally:
        conn.close()
    h = hashlib.sha256()
    with dest.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    elapsed = time.perf_counter() - t0
    assert h.hexdigest() in url_path  # consistent-snapshot name carries the hash: the bytes are the target's
    dest.unlink()
    return elapsed


# -- the box -------------------------------------------------------------------------------------------------------


class TimedTrust:
    """Passes every call through to the real TUF client and adds its duration to ``spent`` (per call kind)."""

    def __init__(self, inner: TrustClient) -> None:
        self._inner = inner
        self.spent: dict[str, float] = {}

    def _add(self, key: str, t0: float) -> None:
        self.spent[key] = self.spent.get(key, 0.0) + time.perf_counter() - t0

    def refresh(self) -> None:
        """Refresh the trusted metadata (timed as ``refresh``)."""
        t0 = time.perf_counter()
        try:
            self._inner.refresh()
        finally:
            self._add("refresh", t0)

    def release(self, name: str, version: str) -> ModelManifest:
        """The signed manifest of ``name@version`` (timed as ``release``)."""
        t0 = time.perf_counter()
        try:
            return self._inner.release(name, version)
        finally:
            self._add("release", t0)

    def fetch(
        self,
        target_path: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download a verified target (timed as ``fetch <file name>``)."""
        t0 = time.perf_counter()
        try:
            return self._inner.fetch(target_path, dest, expected_sha256=expected_sha256, progress=progress)
        finally:
            self._add(f"fetch {target_path.rsplit('/', 1)[-1]}", t0)


def update_once(work: Path, url: str, root: bytes) -> tuple[float, Outcome, dict[str, float], list[str]]:
    """One update on a fresh box.

    Returns:
        Wall seconds of ``update()``, its outcome, the TUF client's time per call kind, the event kinds in order.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="box-", dir=work))
    trust = TimedTrust(trust_client(data_dir, url, root))
    events: list[str] = []

    def emit(kind: str, data: Mapping[str, Any]) -> None:
        del data
        events.append(kind)

    updater = Updater(data_dir=data_dir, factory=FACTORY, trust=trust, emit=emit)
    t0 = time.perf_counter()
    outcome = updater.update(NAME, VERSION)
    elapsed = time.perf_counter() - t0
    assert outcome.state == "committed", outcome
    assert outcome.variant == "float", outcome
    shutil.rmtree(data_dir)
    return elapsed, outcome, trust.spent, events


# -- where the time goes -------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], object], n: int) -> float:
    """Median seconds of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def dissect_download(port: int, url_path: str, work: Path, n: int = 3) -> dict[str, float]:
    """Time, on the served model file, each pass the box's fetch makes over the bytes (medians of ``n``).

    The box's fetch (``TrustClient.fetch`` over ``ResumableFetcher`` and ngclient's ``download_target``) streams the
    body into a ``.part`` and fsyncs it, ngclient reads it back to check length and hash, copies it into a temp file
    beside the destination, which is fsynced and renamed; the updater's verify phase then hashes it again and the
    trial's ``Model`` reads and hashes it once more.
    """
    import urllib3  # noqa: PLC0415 -- what the box's fetcher uses

    pool = urllib3.PoolManager()
    url = f"http://127.0.0.1:{port}{url_path}"
    part, copy = work / "dl.part", work / "dl.copy"

    def get(*, hashing: bool) -> None:
        h = hashlib.sha256()
        r = pool.request("GET", url, preload_content=False)
        with part.open("wb") as f:
            while chunk := r.read1(CHUNK):
                f.write(chunk)
                if hashing:
                    h.update(chunk)
        r.release_conn()

    def copy_file() -> None:
        with part.open("rb") as src, copy.open("wb") as dst:
            shutil.copyfileobj(src, dst)

    out: dict[str, list[float]] = {}
    for _ in range(n):
        for key, fn in (
            ("GET to .part (urllib3 read1, 256 KiB)", lambda: get(hashing=False)),
            ("fsync .part", lambda: _fsync(part)),
            ("SHA-256 pass (ngclient's check)", lambda: file_sha256(part)),
            ("copy .part to the slot (ngclient)", copy_file),
            ("fsync the copy", lambda: _fsync(copy)),
            ("SHA-256 pass (updater's verify)", lambda: file_sha256(copy)),
            ("GET to .part, SHA-256 while streaming", lambda: get(hashing=True)),
        ):
            t0 = time.perf_counter()
            fn()
            out.setdefault(key, []).append(time.perf_counter() - t0)
        part.unlink()
        copy.unlink()
    return {k: statistics.median(v) for k, v in out.items()}


def dissect_trial(
    model_path: Path, manifest: ModelManifest, golden: GoldenSamples, n: int = 3, inferences: int = 15
) -> dict[str, float]:
    """Time the trial's parts on the release's own file (medians of ``n``; of ``inferences`` for one inference)."""
    out: dict[str, float] = {}
    for level in ("all", "basic", "disabled"):
        out[f"load {level}"] = median_time(partial(Model, model_path, warmup=0, optimization=level), n)
        m = Model(model_path, warmup=1, optimization=level)
        x = m.new_input()
        out[f"infer {level}"] = median_time(partial(m.run, x), inferences)
    # The trial as the updater calls it, on the published file (no download), alternating its default number of
    # timed runs with fewer, so the saving is measured rather than estimated.
    samples: dict[int, list[float]] = {TRIAL_RUNS: [], 5: []}
    for _ in range(n):
        for runs, xs in samples.items():
            t0 = time.perf_counter()
            run_trial(manifest, {"float": model_path}, golden, runs=runs)
            xs.append(time.perf_counter() - t0)
    for runs, xs in samples.items():
        out[f"run_trial runs={runs}"] = statistics.median(xs)
    return out


# -- the measurement -----------------------------------------------------------------------------------------------


def run_pairs(
    server: StaticServer, url_path: str, root: bytes, tmp: Path, runs: int
) -> tuple[list[float], list[float], dict[str, list[float]], dict[str, list[float]], list[str], int]:
    """``runs`` alternating baseline / update pairs (so drift on a shared machine hits both alike).

    Returns:
        Baseline seconds, update seconds, update phases, TUF client calls, one update's events, bytes it was served.
    """
    bases: list[float] = []
    updates: list[float] = []
    phases: dict[str, list[float]] = {}
    calls: dict[str, list[float]] = {}
    events: list[str] = []
    update_bytes = 0
    for _ in range(runs):
        bases.append(baseline_once(server.port, url_path, tmp / "baseline.onnx"))
        before = server.bytes_sent()
        wall, outcome, spent, events = update_once(tmp, server.url, root)
        update_bytes = server.bytes_sent() - before
        updates.append(wall)
        for k, v in outcome.timings.items():
            phases.setdefault(k, []).append(v)
        phases.setdefault(BEFORE, []).append(wall - outcome.timings.get("total", wall))
        for k, v in spent.items():
            calls.setdefault(k, []).append(v)
    return bases, updates, phases, calls, events, update_bytes


def _row(label: str, xs: list[float]) -> str:
    return f"{label:46}{statistics.median(xs) * 1e3:7.0f}ms{min(xs) * 1e3:7.0f}ms{max(xs) * 1e3:7.0f}ms"


def _line(label: str, seconds: float, whole: float | None = None) -> str:
    share = f"  {seconds / whole * 100:5.1f}%" if whole else ""
    return f"  {label:44}{seconds * 1e3:7.0f} ms{share}"


def _verdict(ratio: float, quick: bool) -> str:
    if quick:
        return "quick: no verdict"
    return f"target <= {TARGET_RATIO:.1f}x: {'PASS' if ratio <= TARGET_RATIO else 'MISS'}"


def measure(args: argparse.Namespace, model: Path, tmp: Path) -> dict[str, Any]:
    """Publish, serve, warm up, measure the pairs, print the report (and the dissection on a miss)."""
    t0 = time.perf_counter()
    repo, manifest, served = make_fleet(tmp / "fleet", model, args.golden)
    print(f"fleet repository with {NAME}@{VERSION} published in {time.perf_counter() - t0:.1f} s")
    golden_file = next(served.parent.glob("*.golden.npz"))
    size_mb = model.stat().st_size / 1e6
    results: dict[str, Any] = {"model_mb": size_mb, "target": TARGET_RATIO, "quick": args.quick}
    with StaticServer(repo.repository_dir) as server:
        root = repo.root_bytes()
        url_path = "/" + served.relative_to(repo.repository_dir).as_posix()
        # The first session creation in a process pays one-time costs (onnxruntime's kernel registry and allocators,
        # lazy imports, the page cache of the served file): one pair runs first and is not counted.
        warm_base = baseline_once(server.port, url_path, tmp / "baseline.onnx")
        warm_upd = update_once(tmp, server.url, root)[0]
        print(f"warm-up (not counted): 1 baseline {warm_base * 1e3:.0f} ms, 1 update {warm_upd * 1e3:.0f} ms")

        bases, updates, phases, calls, events, update_bytes = run_pairs(server, url_path, root, tmp, args.runs)
        base, upd = statistics.median(bases), statistics.median(updates)
        ratio = upd / base
        verdict = None if args.quick else "PASS" if ratio <= TARGET_RATIO else "MISS"
        med = {k: statistics.median(v) for k, v in phases.items()}
        calls_med = {k: statistics.median(v) for k, v in calls.items()}
        print(f"events of an update: {' > '.join(events)}")
        print(
            f"served per update: {update_bytes / 1e6:.1f} MB (model {size_mb:.1f} MB, golden "
            f"{golden_file.stat().st_size / 1e6:.1f} MB, metadata); per baseline: {size_mb:.1f} MB"
        )
        print()
        print(f"{'loopback, ' + str(args.runs) + ' pairs':46}{'median':>9}{'min':>9}{'max':>9}")
        print(_row("baseline: GET + SHA-256 of the file", bases))
        print(_row("update: update() to committed", updates))
        print(f"ratio update/baseline {ratio:5.2f}x  ({_verdict(ratio, args.quick)})")
        print()
        print("phases of the update (Outcome.timings, medians; share of the update):")
        for k in ("download", "verify", "trial", "commit"):
            print(_line(k, med[k], upd))
        rest = med["total"] - sum(med[k] for k in ("download", "verify", "trial", "commit"))
        print(_line("state writes, events (rest of total)", rest, upd))
        print(_line(BEFORE, med[BEFORE], upd))
        print("inside download (the TUF client's calls, medians):")
        for k, v in calls_med.items():
            print(_line(k, v, upd))
        trial_s = med["trial"]
        print(
            f"trial share of the update: {trial_s / upd * 100:.1f}%; the update without its trial is "
            f"{(upd - trial_s) / base:.2f}x the baseline"
        )
        results.update(
            baseline_s=base,
            update_s=upd,
            ratio=ratio,
            verdict=verdict,
            phases_s=med,
            trust_calls_s=calls_med,
            trial_share=trial_s / upd,
            baseline_samples_s=bases,
            update_samples_s=updates,
        )

        # Quick mode takes every section, whatever the ratio, so that none of them can rot unseen.
        if (args.quick or verdict == "MISS") and not args.no_dissect:
            n, inferences = (1, 2) if args.quick else (3, 15)
            print(f"\nwhere the model fetch goes (the same served file, each pass alone, medians of {n}):")
            dl = dissect_download(server.port, url_path, tmp, n)
            for k, v in dl.items():
                print(_line(k, v))
            passes = sum(v for k, v in dl.items() if "verify" not in k and "while streaming" not in k)
            print(_line("sum of the fetch's passes (first five rows)", passes))
            print(_line("fetch model.onnx as measured in the update", calls_med["fetch model.onnx"]))
            print(
                f"where the trial goes (the published file; loads and run_trial medians of {n}, "
                f"inferences of {inferences}):"
            )
            golden = load_golden(golden_file, input_info=manifest.input)
            tr = dissect_trial(served, manifest, golden, n, inferences)
            for level in ("all", "basic", "disabled"):
                print(
                    f"  Model() optimization={level:<9} load (read+hash+session) {tr[f'load {level}'] * 1e3:6.1f} ms"
                    f"   one inference {tr[f'infer {level}'] * 1e3:6.1f} ms"
                )
            n_inf = WARMUP_RUNS + args.golden + TRIAL_RUNS
            est = tr["load all"] + n_inf * tr["infer all"]
            print(
                f"  estimate at 'all': load + {n_inf} inferences ({WARMUP_RUNS} warm-up + {args.golden} golden + "
                f"{TRIAL_RUNS} timed) = {est * 1e3:.0f} ms (the update's trial phase: {trial_s * 1e3:.0f} ms)"
            )
            print(_line(f"run_trial(runs={TRIAL_RUNS}) alone", tr[f"run_trial runs={TRIAL_RUNS}"]))
            print(_line("run_trial(runs=5) alone", tr["run_trial runs=5"]))
            results.update(download_passes_s=dl, trial_parts_s=tr)

        if args.link_mbit:
            server.throttle(args.link_mbit * 1e6 / 8)
            pairs = max(1, args.runs // 2)
            lb, lu, lph, _, _, _ = run_pairs(server, url_path, root, tmp, pairs)
            server.throttle(None)
            lbase, lupd = statistics.median(lb), statistics.median(lu)
            lratio = lupd / lbase
            print(f"\n{f'paced link {args.link_mbit:g} Mbit/s, {pairs} pairs':46}{'median':>9}{'min':>9}{'max':>9}")
            print(_row("baseline: GET + SHA-256 of the file", lb))
            print(_row("update: update() to committed", lu))
            print(
                f"ratio update/baseline {lratio:5.2f}x  ({_verdict(lratio, args.quick)}); "
                f"trial {statistics.median(lph['trial']) * 1e3:.0f} ms"
            )
            results["link"] = {"mbit": args.link_mbit, "baseline_s": lbase, "update_s": lupd, "ratio": lratio}
    return results


def main() -> int:
    """Run the benchmark and print its report."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed pairs of baseline and update (default 5)")
    ap.add_argument("--golden", type=int, default=3, help="golden samples published with the release (default 3)")
    ap.add_argument(
        "--link-mbit", type=float, default=None, help="also measure runs/2 pairs with the server paced to this rate"
    )
    ap.add_argument("--no-dissect", action="store_true", help="skip taking the update apart when the ratio misses")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument(
        "--quick", action="store_true", help="a small run of every section that only proves the benchmark runs"
    )
    args = ap.parse_args()
    if args.runs < 1 or args.golden < 1 or (args.link_mbit is not None and args.link_mbit <= 0):
        ap.error("--runs and --golden must be >= 1, --link-mbit > 0")
    if args.quick:
        args.runs, args.golden = 1, 1
        if args.link_mbit is None:
            args.link_mbit = QUICK_LINK_MBIT
    model = mobilenet_fp32()
    print(
        f"cpus: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}; trial threads: 1; "
        f"model {model.name}: {model.stat().st_size / 1e6:.1f} MB; timed pairs: {args.runs}"
    )
    if args.quick:
        print("quick: 1 pair, 1 golden sample, every section; a check that it runs, the figures are not worth quoting")
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as tmp:
        results = measure(args, model, Path(tmp))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
