"""``edge fleet models|publishers`` through the real command line (``python -m edge`` subprocesses)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
from repo_helpers import DIGITS_FP32, digits_release_files, make_golden
from tuf.api.metadata import Metadata

from edge.fleet.models.repository import FleetRepository


def test_operator_workflow(tmp_path: Path, edge_cli) -> None:
    fleet = str(tmp_path / "fleet")

    def run(*args: str, ok: bool = True):
        r = edge_cli("fleet", "--dir", fleet, *args)
        assert (r.returncode == 0) == ok, r.stderr
        return r

    run("models", "init", "--threshold", "root=2", "--expiry", "timestamp=2")
    repo = FleetRepository.load(Path(fleet))
    assert repo.metadata("root").signed.roles["root"].threshold == 2
    assert repo.expiry_days["timestamp"] == 2

    run("publishers", "keygen", "acme", "--out", str(tmp_path / "pk"))
    assert stat.S_IMODE((tmp_path / "pk" / "acme.pem").stat().st_mode) == 0o600
    run("publishers", "add", "acme", str(tmp_path / "pk" / "acme.pub"), "--models", "digits,mobilenet")

    model = digits_release_files(tmp_path, "1.0.0")
    fv = digits_release_files(tmp_path, "1.0.0", source=DIGITS_FP32)
    with np.load(make_golden(model, tmp_path / "full.npz", n=3)) as z:
        np.savez(tmp_path / "inputs.npz", inputs=z["inputs"])
    key = str(tmp_path / "pk" / "acme.pem")
    r = run(
        "models", "publish", str(model), "--name", "digits", "--version", "1.0.0", "--publisher", "acme",
        "--key", key, "--float", str(fv), "--golden", str(tmp_path / "inputs.npz"), "--tolerance", "0.1",
    )  # fmt: skip
    assert "published digits@1.0.0 by acme" in r.stdout and "golden 3 samples, tolerance 0.1" in r.stdout

    listed = json.loads(run("models", "list", "--json").stdout)
    assert [(m["name"], m["version"], m["golden"]["count"]) for m in listed] == [("digits", "1.0.0", 3)]
    assert listed[0]["float_variant"]["path"] == "digits/1.0.0/model-float.onnx"
    pubs = json.loads(run("publishers", "list", "--json").stdout)
    assert [(p["name"], p["models"], p["releases"]) for p in pubs] == [("acme", ["digits", "mobilenet"], 1)]

    # Refusals print the usual error line and exit non-zero; nothing changes.
    r = run("models", "publish", str(model), "--name", "digits", "--version", "1.0.0", "--publisher", "acme",
            "--key", key, ok=False)  # fmt: skip
    # A refusal of the repository (an InputError) is exit 1; 2 is kept for usage and configuration (docs/cli.md).
    assert r.returncode == 1 and r.stderr.startswith("edge: error: ") and "not newer" in r.stderr
    r = run("publishers", "add", "acme", str(tmp_path / "pk" / "acme.pub"), "--models", "x", ok=False)
    assert "exists already" in r.stderr

    # Publisher rotation with immediate re-signing, then a top-level rotation and a refresh.
    run("publishers", "keygen", "acme2", "--out", str(tmp_path / "pk"))
    run(
        "publishers", "rotate", "acme", str(tmp_path / "pk" / "acme2.pub"), "--sign-key", str(tmp_path / "pk/acme2.pem")
    )
    repo = FleetRepository.load(Path(fleet))
    repo.metadata("targets").verify_delegate("acme", repo.metadata("acme"))
    before = repo.metadata("timestamp").signed.version
    r = run("models", "keys", "rotate", "snapshot")
    assert "new key(s)" in r.stdout
    run("models", "refresh")
    assert FleetRepository.load(Path(fleet)).metadata("timestamp").signed.version == before + 2

    out = tmp_path / "trusted-root.json"
    run("models", "root", "--out", str(out))
    root = Metadata.from_bytes(out.read_bytes())
    assert root.signed.version == 2 and out.read_bytes() == FleetRepository.load(Path(fleet)).root_bytes()

    run("publishers", "remove", "acme")
    assert json.loads(run("models", "list", "--json").stdout) == []


def test_errors_without_repository(tmp_path: Path, edge_cli) -> None:
    r = edge_cli("fleet", "--dir", str(tmp_path / "none"), "models", "list")
    assert r.returncode == 1 and "edge: error: no TUF repository" in r.stderr and "models init" in r.stderr
    r = edge_cli("fleet", "--dir", str(tmp_path / "f"), "models", "init", "--threshold", "root")
    assert r.returncode == 2 and "ROLE=VALUE" in r.stderr


def test_publish_requires_sets_the_oldest_runtime_a_box_may_run(tmp_path: Path, edge_cli) -> None:
    """`--requires` lowers (or raises) a runtime minimum; the runtimes not named keep the publisher's own versions.

    Without it a release requires the publishing machine's onnxruntime, which a box with an older image refuses
    ("incompatible"): the emulated box of docs/system.md is such a box.
    """
    fleet = str(tmp_path / "fleet")
    assert edge_cli("fleet", "--dir", fleet, "models", "init").returncode == 0
    assert edge_cli("fleet", "publishers", "keygen", "acme", "--out", str(tmp_path / "pk")).returncode == 0
    pub = str(tmp_path / "pk" / "acme.pub")
    assert edge_cli("fleet", "--dir", fleet, "publishers", "add", "acme", pub, "--models", "digits").returncode == 0
    model = digits_release_files(tmp_path, "1.0.0")
    publish = ("fleet", "--dir", fleet, "models", "publish", str(model), "--name", "digits", "--version", "1.0.0",
               "--publisher", "acme", "--key", str(tmp_path / "pk" / "acme.pem"), "--json")  # fmt: skip
    for bad, named in (("tensorflow=2.0", "RUNTIME one of onnxruntime, edge, python"), ("onnxruntime", "RUNTIME=")):
        r = edge_cli(*publish, "--requires", bad)
        assert r.returncode == 2 and named in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = edge_cli(*publish, "--requires", "onnxruntime=1.20", "--requires", "python=3.11")
    assert r.returncode == 0, r.stderr
    requires = json.loads(r.stdout)["requires"]
    assert requires["onnxruntime"] == "1.20" and requires["python"] == "3.11"
    assert requires["edge"] == FleetRepository.load(Path(fleet)).releases("digits")[0].requires["edge"]
    import edge  # noqa: PLC0415

    assert requires["edge"] == edge.__version__
