"""``edge config check|show`` and ``edge gateway config check|show`` as real processes; relative paths from anywhere.

The README says relative paths in the configuration are resolved against the file's directory. These tests load a
configuration from another working directory than the file's (the ``cwd`` of a real ``python -m edge`` process)
and check every path the service would open. Tests by fault: a file with several mistakes, a drop-in with one, a
box whose model, frames or output directory is missing, a box not enrolled yet, credentials in URLs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge._fs import atomic_write
from edge.config import DROPIN_NAME, load_config
from edge.fleet.pki.ca import FleetCA
from edge.identity import generate_device_identity, load_private_key

ROOT = Path(__file__).resolve().parent.parent
FACTORY_MODEL = ROOT / "edge" / "models" / "digits-int8.onnx"


def edge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m edge ARGS`` started in ``cwd``: not the directory of the configuration file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
        check=False,
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A box's files beside its configuration: etc/edge.toml names them all relatively. Returns etc/."""
    etc = tmp_path / "etc"
    (etc / "models").mkdir(parents=True)
    (etc / "state").mkdir()
    (etc / "out").mkdir()
    shutil.copy(FACTORY_MODEL, etc / "models" / "digits.onnx")
    np.savez(etc / "frames.npz", frames=np.zeros((2, 28, 28, 3), dtype=np.uint8))
    (etc / "edge.toml").write_text(
        '[device]\ndata_dir = "state"\n'
        '[model]\npath = "models/digits.onnx"\n'
        '[source]\nkind = "npz"\npath = "frames.npz"\npixel_format = "RGB888"\n'
        '[sink]\npath = "out/records.jsonl"\n',
        encoding="utf-8",
    )
    (tmp_path / "elsewhere").mkdir()
    return etc


# -- relative paths -------------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_file_not_the_working_directory(box: Path) -> None:
    elsewhere = box.parent / "elsewhere"
    # The drop-in lives in data_dir, found through the relative data_dir; its own relative model path is its own.
    shutil.copy(FACTORY_MODEL, box / "state" / "dropin-model.onnx")
    (box / "state" / DROPIN_NAME).write_text('[model]\npath = "dropin-model.onnx"\n', encoding="utf-8")
    proc = edge("config", "show", "--json", "--config", "../etc/edge.toml", cwd=elsewhere)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["device"]["data_dir"] == str(box / "state")
    assert shown["model"]["path"] == str(box / "state" / "dropin-model.onnx")
    assert shown["source"]["path"] == str(box / "frames.npz")
    assert shown["sink"]["path"] == str(box / "out" / "records.jsonl")
    # State paths stay relative to data_dir, which is itself resolved against the file.
    assert shown["telemetry"]["cert"] == str(box / "state" / "keys" / "device.pem")
    assert shown["telemetry"]["outbox"] == str(box / "state" / "outbox.sqlite")
    assert shown["ota"]["root"] == str(box / "state" / "keys" / "tuf-root.json")


def test_the_loader_gives_the_same_paths_from_any_directory(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(box)
    here = load_config("edge.toml")
    monkeypatch.chdir(box.parent / "elsewhere")
    there = load_config("../etc/edge.toml")
    assert here == there
    assert here.device.data_dir == box / "state" and here.sink.path == str(box / "out" / "records.jsonl")


def test_edge_run_from_another_directory_writes_where_the_file_says(box: Path) -> None:
    proc = edge("run", "--config", str(box / "edge.toml"), "--frames", "2", cwd=box.parent / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((box / "out" / "records.jsonl").read_text().splitlines()) >= 1
    assert not (box.parent / "elsewhere" / "out").exists()


def test_gateway_paths_resolve_against_the_file_and_the_fleet_dir(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    (tmp_path / "elsewhere").mkdir()
    conf = tmp_path / "srv" / "gateway.toml"
    conf.write_text('[gateway]\nfleet_dir = "fleet"\nstore = "sqlite:db/fleet.db"\n', encoding="utf-8")
    proc = edge("gateway", "config", "show", "--json", "--config", "../srv/gateway.toml", cwd=tmp_path / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    fleet = tmp_path / "srv" / "fleet"
    assert shown["gateway"]["fleet_dir"] == str(fleet)
    assert shown["gateway"]["store"] == f"sqlite:///{fleet / 'db' / 'fleet.db'}"
    assert shown["broker"]["cert"] == str(fleet / "gateway" / "gateway.pem")
    assert shown["gateway"]["id"] == ""  # the certificate's CN


# -- edge config check ----------------------------------------------------------------------------------------------


def test_check_of_a_good_file_is_one_line_and_exit_0(box: Path) -> None:
    proc = edge("config", "check", "--config", "../etc/edge.toml", cwd=box.parent / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"edge: configuration ../etc/edge.toml (no drop-in {box / 'state' / DROPIN_NAME}) is ok\n"
    (box / "state" / DROPIN_NAME).write_text("[model]\nthreads = 2\n", encoding="utf-8")
    proc = edge("config", "check", "--config", str(box / "edge.toml"), cwd=box.parent / "elsewhere")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"edge: configuration {box / 'edge.toml'} with the drop-in {box / 'state' / DROPIN_NAME} is ok\n"
    )


def test_check_reports_every_mistake_of_the_file_at_once(box: Path) -> None:
    conf = box / "edge.toml"
    conf.write_text('[model]\nthread = 2\nwarmup = -1\n[telemetry]\nreciept_key = ""\nport = 0\n', encoding="utf-8")
    proc = edge("config", "check", "--config", str(conf), cwd=box.parent / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "edge: config key 'model.thread': got 2, expected no such key (did you mean 'model.threads'?)",
        "edge: config key 'telemetry.reciept_key': got '', expected no such key "
        "(did you mean 'telemetry.receipt_key'?)",
        "edge: config key 'model.warmup': got -1, expected an integer >= 0 and <= 1000",
        "edge: config key 'telemetry.port': got 0, expected a TCP port number 1..65535",
        f"edge: configuration {conf} has 4 errors",
    ]
    assert proc.stdout == ""


def test_check_names_the_dropin_in_each_of_its_errors(box: Path) -> None:
    dropin = box / "state" / DROPIN_NAME
    dropin.write_text("[telemetry]\nhots = 'x'\nport = 70000\n", encoding="utf-8")
    proc = edge("config", "check", "--config", str(box / "edge.toml"), cwd=box.parent / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("edge: config key 'telemetry.hots': got 'x', expected no such key (did you mean")
    assert lines[1].startswith("edge: config key 'telemetry.port': got 70000, expected a TCP port number")
    assert all(f"(in the drop-in {dropin})" in line for line in lines[:2]), lines
    assert lines[2] == f"edge: configuration {box / 'edge.toml'} has 2 errors"


def test_check_finds_what_edge_run_would_refuse_on_this_box(box: Path) -> None:
    (box / "models" / "digits.onnx").write_bytes(b"not an onnx model" * 10)
    (box / "frames.npz").unlink()
    shutil.rmtree(box / "out")
    proc = edge("config", "check", "--config", str(box / "edge.toml"), cwd=box.parent / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert [line.split("'")[1] for line in lines[:-1]] == ["model.path", "source.path", "sink.path"], lines
    assert str(box / "models" / "digits.onnx") in lines[0] and "a model this box can run" in lines[0]
    assert "it does not exist" in lines[1] and str(box / "frames.npz") in lines[1]
    assert f"{box / 'out'}: it does not exist" in lines[2]
    # --no-model checks the file is there and does not load it.
    proc = edge("config", "check", "--no-model", "--config", str(box / "edge.toml"), cwd=box)
    assert [line.split("'")[1] for line in proc.stderr.splitlines()[:-1]] == ["source.path", "sink.path"]


def test_check_says_a_box_that_is_not_enrolled_is_not_enrolled(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    conf = tmp_path / "edge.toml"
    conf.write_text('[device]\ndata_dir = "data"\n[sink]\nkind = "telemetry"\n', encoding="utf-8")
    proc = edge("config", "check", "--config", str(conf), cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 2
    text = proc.stderr
    assert "config key 'telemetry.cert'" in text and "edge enroll --claim CODE" in text
    assert f"config key 'telemetry.ca': got '{tmp_path / 'data' / 'keys' / 'fleet-ca.pem'}'" in text
    assert "config key 'telemetry.key'" in text and "edge keys generate" in text
    # What the service runs on without is a warning, not an error.
    assert "edge: warning: config key 'telemetry.receipt_key'" in text
    assert (
        text.splitlines()[-1]
        == f"edge: configuration {conf} (no drop-in {tmp_path / 'data' / DROPIN_NAME}) has 3 errors"
    )


def test_check_of_an_enrolled_box_is_ok_with_its_warnings(tmp_path: Path, pki) -> None:
    keys = tmp_path / "data" / "keys"
    generate_device_identity(keys, "box-7")
    creds = pki.client("box-7", key=load_private_key(keys / "device.key"))
    shutil.copy(creds.cert, keys / "device.pem")
    shutil.copy(creds.ca, keys / "fleet-ca.pem")
    conf = tmp_path / "edge.toml"
    conf.write_text('[device]\ndata_dir = "data"\n[sink]\nkind = "telemetry"\n', encoding="utf-8")
    proc = edge("config", "check", "--config", str(conf), cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"edge: configuration {conf} ") and proc.stdout.endswith(" is ok\n")
    assert [line.split("'")[1] for line in proc.stderr.splitlines()] == ["telemetry.fleet_key", "telemetry.receipt_key"]


def test_check_of_a_missing_file_names_it(tmp_path: Path) -> None:
    proc = edge("config", "check", "--config", "nope.toml", cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "edge: config key '<file>': got 'nope.toml', expected an existing configuration file",
        "edge: configuration nope.toml has 1 error",
    ]


# -- edge config show -----------------------------------------------------------------------------------------------


def effective(conf: Path, cwd: Path) -> dict[str, dict[str, object]]:
    """What ``edge config show --json`` says the configuration at ``conf`` is."""
    proc = edge("config", "show", "--json", "--config", str(conf), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_show_prints_a_valid_configuration_equal_to_the_effective_one(box: Path) -> None:
    (box / "state" / DROPIN_NAME).write_text('[telemetry]\nhost = "broker.example.net"\n', encoding="utf-8")
    proc = edge("config", "show", "--config", str(box / "edge.toml"), cwd=box.parent / "elsewhere")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    tomllib.loads(proc.stdout)  # a valid TOML document
    shown = box.parent / "shown.toml"
    shown.write_text(proc.stdout, encoding="utf-8")
    # Loaded as a configuration, from yet another directory, it is the same configuration.
    assert effective(shown, box) == effective(box / "edge.toml", box.parent / "elsewhere")
    assert effective(shown, box)["telemetry"]["host"] == "broker.example.net"  # the drop-in's value, merged


def test_show_fills_the_factory_model_and_lists_what_is_not_set(tmp_path: Path) -> None:
    conf = tmp_path / "edge.toml"
    conf.write_text('[device]\ndata_dir = "data"\n', encoding="utf-8")
    proc = edge("config", "show", "--config", str(conf), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = tomllib.loads(proc.stdout)
    assert Path(doc["model"]["path"]).name == "digits-int8.onnx"
    assert "port" not in doc["source"]  # "" is no serial device: not set, and the output stays a valid file
    assert "# Not set (taken from the model or off): source.path, source.port, preprocess.crop" in proc.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(proc.stdout, encoding="utf-8")
    assert effective(shown, tmp_path) == effective(conf, tmp_path)
    assert load_config(conf).model.path is None  # the file names no model: the factory one runs


@pytest.mark.parametrize("as_json", [False, True])
def test_show_masks_credentials(tmp_path: Path, as_json: bool) -> None:
    conf = tmp_path / "edge.toml"
    conf.write_text(
        '[device]\ndata_dir = "data"\n'
        '[source]\nkind = "stream"\nurl = "rtsp://viewer:hunter2@cam.local:554/s1"\n'
        '[ota]\nrepository = "https://fleet:s3cret@models.example.net/fleet/"\n',
        encoding="utf-8",
    )
    proc = edge("config", "show", *(["--json"] if as_json else []), "--config", str(conf), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "s3cret" not in proc.stdout
    doc = json.loads(proc.stdout) if as_json else tomllib.loads(proc.stdout)
    assert doc["source"]["url"] == "rtsp://viewer:***@cam.local:554/s1"
    assert doc["ota"]["repository"] == "https://fleet:***@models.example.net/fleet/"


def test_show_of_a_bad_file_exits_2_naming_every_key(tmp_path: Path) -> None:
    conf = tmp_path / "edge.toml"
    conf.write_text("[model]\nthreads = 0\ntop_k = 0\n", encoding="utf-8")
    proc = edge("config", "show", "--config", str(conf), cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'model.threads'" in proc.stderr and "'model.top_k'" in proc.stderr


# -- the gateway's configuration ------------------------------------------------------------------------------------


def test_check_gateway_reports_every_error_then_ok(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.toml"
    conf.write_text('[gateway]\nfleet_dir = "fleet"\nbatch_max = 0\n[broker]\nprot = 1\n', encoding="utf-8")
    proc = edge("gateway", "config", "check", "--config", str(conf), cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "edge: config key 'broker.prot': got 1, expected no such key (did you mean 'broker.port'?)",
        "edge: config key 'gateway.batch_max': got 0, expected an integer >= 1 and <= 5000",
        f"edge: configuration {conf} has 2 errors",
    ]
    conf.write_text('[gateway]\nfleet_dir = "fleet"\n', encoding="utf-8")
    proc = edge("gateway", "config", "check", "--config", str(conf), cwd=tmp_path)
    assert proc.returncode == 2 and "config key 'broker.cert'" in proc.stderr  # no certificate yet: says how
    assert "edge fleet ca issue-client" in proc.stderr
    now = datetime.datetime.now(datetime.UTC)
    fleet = tmp_path / "fleet"
    cert, key = FleetCA.init(fleet, now=now).issue_client("gateway-1", now=now, days=1)
    (fleet / "gateway").mkdir()
    atomic_write(fleet / "gateway" / "gateway.pem", cert)
    atomic_write(fleet / "gateway" / "gateway.key", key, mode=0o600)
    proc = edge("gateway", "config", "check", "--config", str(conf), cwd=tmp_path / "fleet")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"edge: configuration {conf} is ok\n"


def test_gateway_show_masks_the_stores_password_and_is_a_valid_file(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        '[gateway]\nstore = "postgresql://edge:hunter2@db.example.net/fleet"\n'
        '[ledger]\nceilings = { digits = 120.0, "detector@2.0.0" = 15.0 }\n',
        encoding="utf-8",
    )
    proc = edge("gateway", "config", "show", "--config", str(conf), cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout
    doc = tomllib.loads(proc.stdout)
    assert doc["gateway"]["store"] == "postgresql://edge:***@db.example.net/fleet"
    assert doc["ledger"]["ceilings"] == {"digits": 120.0, "detector@2.0.0": 15.0}
    shown = tmp_path / "shown.toml"
    shown.write_text(proc.stdout, encoding="utf-8")
    again = edge("gateway", "config", "show", "--config", str(shown), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert tomllib.loads(again.stdout) == doc
