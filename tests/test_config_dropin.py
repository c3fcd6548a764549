"""Per-box settings and identity: the drop-in on the data partition, and the device id from the certificate.

One image serves many boxes: ``/etc/edge/edge.toml`` is the same everywhere, ``<data_dir>/edge.toml`` (written at
enrollment) overrides it key by key, and the id is the CN of the box's certificate. Tests by fault: a drop-in that
breaks a rule, a box configured as another box than its certificate, a box not enrolled yet.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from mqtt_broker import free_port

import edge.config
from edge.config import (
    DROPIN_NAME,
    FALLBACK_DEVICE_ID,
    Config,
    dropin_path,
    load_config,
    parse_config,
    resolve_device_id,
    write_dropin,
)
from edge.errors import ConfigError
from edge.identity import (
    CertificateFileError,
    CertificateMissingError,
    device_id_from_certificate,
    generate_device_identity,
    load_private_key,
)
from edge.identity.certificate import MAX_CERTIFICATE_BYTES
from edge.telemetry.inspect import inspect_outbox
from edge.toml_config import dump_toml


def main_file(tmp_path: Path, body: str = "", *, data: Path | None = None) -> Path:
    """An image's /etc/edge/edge.toml: ``data`` as device.data_dir, then ``body``."""
    data = data or tmp_path / "data"
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    path = etc / "edge.toml"
    path.write_text(f'[device]\ndata_dir = "{data}"\n{body}', encoding="utf-8")
    return path


def dropin(data: Path, text: str) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    path = data / DROPIN_NAME
    path.write_text(text, encoding="utf-8")
    return path


def self_signed(path: Path, *names: str) -> Path:
    """A PEM certificate whose subject has one CN per name (none: no CN at all)."""
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]) or x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleet")]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def enroll(data: Path, pki, device_id: str) -> None:
    """What enrollment leaves in data_dir/keys: the key (`edge keys generate`), its certificate, the fleet CA."""
    keys = data / "keys"
    generate_device_identity(keys, device_id)
    creds = pki.client(device_id, key=load_private_key(keys / "device.key"))
    shutil.copy(creds.cert, keys / "device.pem")
    shutil.copy(creds.ca, keys / "fleet-ca.pem")


def telemetry_config(data: Path, device_id: str = "") -> Config:
    device = {"data_dir": str(data), **({"id": device_id} if device_id else {})}
    return parse_config({"device": device, "sink": {"kind": "telemetry"}})


def log_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


# -- the drop-in -------------------------------------------------------------------------------------------------


def test_dropin_overrides_only_the_keys_it_names(tmp_path: Path) -> None:
    path = main_file(
        tmp_path,
        '[telemetry]\nhost = "broker.image"\nport = 1883\nbatch_records = 50\n[log]\nlevel = "debug"\n',
    )
    dropin(tmp_path / "data", '[telemetry]\nhost = "broker.box-7"\n')
    cfg = load_config(path)
    assert cfg.telemetry.host == "broker.box-7"  # the drop-in's
    assert (cfg.telemetry.port, cfg.telemetry.batch_records) == (1883, 50)  # the main file's, same section
    assert cfg.log.level == "debug"  # another section of the main file
    assert cfg.telemetry.batch_age_s == 1.0  # set by neither: the default


def test_without_a_dropin_the_main_file_alone_is_the_configuration(tmp_path: Path) -> None:
    path = main_file(tmp_path, '[telemetry]\nhost = "broker.image"\n')
    assert not dropin_path(load_config(path)).exists()
    expected = parse_config({"device": {"data_dir": str(tmp_path / "data")}, "telemetry": {"host": "broker.image"}})
    assert load_config(path) == expected


def test_dropin_path_follows_data_dir(tmp_path: Path) -> None:
    assert dropin_path(tmp_path) == tmp_path / "edge.toml"
    assert dropin_path(Config()) == Path("/data/edge/edge.toml")
    assert (
        dropin_path(load_config(main_file(tmp_path, data=tmp_path / "elsewhere"))) == tmp_path / "elsewhere/edge.toml"
    )


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[model]\nthreads = 0\n", "model.threads", "an integer >= 1"),
        ("[telemetry]\nhots = 'x'\n", "telemetry.hots", "did you mean 'telemetry.host'?"),
        ("[telemetry]\nport = 'x'\n", "telemetry.port", "TCP port"),
        ("[device]\nid = 'not/an/id'\n", "device.id", "a device id"),
        ("[telemetry\n", "<file>", "valid TOML (line 1"),
    ],
)
def test_an_error_in_the_dropin_names_its_path_and_the_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = main_file(tmp_path)
    bad = dropin(tmp_path / "data", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert expected in str(info.value)
    assert str(bad) in str(info.value)


def test_the_same_error_in_the_main_file_does_not_blame_the_dropin(tmp_path: Path) -> None:
    path = main_file(tmp_path, "[model]\nthreads = 0\n")
    dropin(tmp_path / "data", '[telemetry]\nhost = "b"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "model.threads" and "drop-in" not in str(info.value)


def test_dropin_setting_data_dir_is_refused(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    bad = dropin(tmp_path / "data", f'[device]\ndata_dir = "{tmp_path / "other"}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "device.data_dir"
    assert str(bad) in str(info.value) and "main file" in str(info.value)


def test_keys_that_depend_on_each_other_are_checked_after_the_merge(tmp_path: Path) -> None:
    # The drop-in names the kind, the main file the path: valid together, though neither would be alone.
    path = main_file(tmp_path, '[source]\npath = "frames.npz"\n')
    dropin(tmp_path / "data", '[source]\nkind = "npz"\n')
    cfg = load_config(path)
    assert cfg.source.kind == "npz" and cfg.source.path == tmp_path / "etc" / "frames.npz"
    # Without the path anywhere, the error names the key and both files.
    path = main_file(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "source.path"
    assert str(path) in str(info.value) and str(tmp_path / "data" / "edge.toml") in str(info.value)


def test_relative_paths_resolve_against_the_file_that_sets_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = main_file(tmp_path, '[source]\nkind = "npz"\npath = "frames.npz"\n[model]\npath = "image.onnx"\n')
    dropin(data, '[model]\npath = "models/box.onnx"\n[telemetry]\ncert = "keys/box.pem"\n')
    cfg = load_config(path)
    assert cfg.model.path == data.resolve() / "models/box.onnx"  # the drop-in's, against data_dir
    assert cfg.source.path == tmp_path / "etc" / "frames.npz"  # the main file's, against /etc/edge
    assert cfg.telemetry.cert == Path("keys/box.pem")  # a state path: relative to data_dir when used
    assert edge.config.data_path(cfg, cfg.telemetry.cert) == data / "keys/box.pem"


def test_a_main_file_inside_data_dir_is_read_once(tmp_path: Path) -> None:
    # Development setups (and tools/faults.py) keep the one file in data_dir: it is its own drop-in, and the
    # data_dir it sets is not refused as the drop-in's.
    data = tmp_path / "data"
    path = dropin(data, f'[device]\ndata_dir = "{data}"\n[log]\nlevel = "warning"\n')
    cfg = load_config(path)
    assert cfg.device.data_dir == data and cfg.log.level == "warning"


def test_an_unreadable_dropin_is_an_error_not_skipped(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    (tmp_path / "data" / DROPIN_NAME).mkdir(parents=True)  # exists, cannot be read as a file
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "<file>" and str(tmp_path / "data" / DROPIN_NAME) in str(info.value)


# -- writing the drop-in ------------------------------------------------------------------------------------------


def test_write_dropin_round_trips_and_keeps_existing_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = main_file(tmp_path, '[telemetry]\nhost = "broker.image"\nbatch_records = 50\n')
    written = write_dropin(data, {"telemetry": {"host": "broker.fleet", "port": 18883}})
    assert written == dropin_path(data) and written.exists()  # data_dir created on the way
    written2 = write_dropin(
        data, {"ota": {"repository": "https://models.example.net/fleet/"}, "telemetry": {"port": 8884}}
    )
    assert written2 == written
    assert tomllib.loads(written.read_text(encoding="utf-8")) == {
        "telemetry": {"host": "broker.fleet", "port": 8884},
        "ota": {"repository": "https://models.example.net/fleet/"},
    }
    cfg = load_config(path)
    assert (cfg.telemetry.host, cfg.telemetry.port, cfg.telemetry.batch_records) == ("broker.fleet", 8884, 50)
    assert cfg.ota.repository == "https://models.example.net/fleet/"
    assert [p.name for p in data.iterdir()] == [DROPIN_NAME]  # no temporary file left behind


@pytest.mark.parametrize(
    ("updates", "key"),
    [
        ({"telemetry": {"port": 0}}, "telemetry.port"),
        ({"telemetry": {"hots": "x"}}, "telemetry.hots"),
        ({"device": {"data_dir": "/elsewhere"}}, "device.data_dir"),
        ({"telemtry": {"host": "x"}}, "telemtry"),
    ],
)
def test_write_dropin_refuses_what_the_next_start_would_refuse_and_leaves_the_file(
    tmp_path: Path, updates: dict, key: str
) -> None:
    data = tmp_path / "data"
    path = write_dropin(data, {"telemetry": {"host": "broker.fleet"}})
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        write_dropin(data, updates)
    assert info.value.key == key and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in data.iterdir()] == [DROPIN_NAME]


def test_write_dropin_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    path = write_dropin(data, {"telemetry": {"host": "broker.fleet", "port": 18883}})
    before = path.read_bytes()

    def power_cut(*_args: object) -> None:
        raise OSError("power cut before the rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        write_dropin(data, {"telemetry": {"host": "broker.other"}})
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file, whole
    assert [p.name for p in data.iterdir()] == [DROPIN_NAME]


def test_write_dropin_keeps_a_restricted_mode(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_dropin(data, {"telemetry": {"host": "broker.fleet"}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # new: readable by the service's user whoever wrote it
    path.chmod(0o600)
    write_dropin(data, {"ota": {"repository": "https://user:secret@models.example.net/fleet/"}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- the TOML writer -------------------------------------------------------------------------------------------------

_KEYS = st.text(min_size=1, max_size=12)
_SCALARS = (
    st.text(max_size=30)  # every Unicode scalar value: controls, quotes, backslashes, DEL, astral planes
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
_DOCS = st.dictionaries(
    _KEYS, st.dictionaries(_KEYS, _SCALARS | st.lists(_SCALARS, max_size=4), max_size=6), max_size=4
)


@given(_DOCS)
def test_dump_toml_round_trips_through_tomllib(doc: dict) -> None:
    assert tomllib.loads(dump_toml(doc)) == doc


@pytest.mark.parametrize(
    "s", ['"', "\\", "\x7f", "\x00", "\x1f", "a\nb\r\tc", "'''", '"""', "é", "\U0001f600", "\ufeff", "[x]", "# no"]
)
def test_dump_toml_escapes_what_a_basic_string_cannot_hold(s: str) -> None:
    text = dump_toml({"t": {"k": s, "odd key": [s, 1, 2.5, True]}})
    assert tomllib.loads(text) == {"t": {"k": s, "odd key": [s, 1, 2.5, True]}}


def test_dump_toml_refuses_what_toml_cannot_hold() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        dump_toml({"t": {"k": "\ud800"}})
    with pytest.raises(TypeError, match="Path"):
        dump_toml({"t": {"k": Path("/x")}})
    with pytest.raises(TypeError):
        dump_toml({"t": {"k": [[1]]}})


# -- the device id from the certificate ---------------------------------------------------------------------------


def test_the_id_is_the_certificates_cn(tmp_path: Path, pki) -> None:
    assert device_id_from_certificate(pki.client("cam-17").cert) == "cam-17"
    assert device_id_from_certificate(self_signed(tmp_path / "c.pem", "box-9")) == "box-9"


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (("not/a/device",), "subject CN is a device id"),
        ((".hidden",), "subject CN is a device id"),
        (("-dash",), "subject CN is a device id"),
        (("cam 1",), "subject CN is a device id"),
        ((), "one CN"),
        (("box-1", "box-2"), "one CN"),
    ],
)
def test_a_cn_that_is_no_device_id_is_refused_naming_the_file(tmp_path: Path, names: tuple, problem: str) -> None:
    cert = self_signed(tmp_path / "c.pem", *names)
    with pytest.raises(CertificateFileError, match=problem) as info:
        device_id_from_certificate(cert)
    assert str(cert) in str(info.value)


def test_a_file_that_is_no_certificate_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    with pytest.raises(CertificateMissingError) as info:
        device_id_from_certificate(missing)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateFileError, match=r"PEM X\.509") as info:
        device_id_from_certificate(garbage)
    assert str(garbage) in str(info.value)
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"x" * (MAX_CERTIFICATE_BYTES + 1))
    with pytest.raises(CertificateFileError, match="at most"):
        device_id_from_certificate(huge)


def test_telemetry_takes_the_id_from_the_certificate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    self_signed(data / "keys/device.pem", "cam-3")
    assert resolve_device_id(telemetry_config(data)) == "cam-3"
    assert resolve_device_id(telemetry_config(data, "cam-3")) == "cam-3"  # set and equal: fine


def test_telemetry_refuses_a_configured_id_that_is_not_the_certificates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cert = self_signed(data / "keys/device.pem", "cam-3")
    with pytest.raises(ConfigError) as info:
        resolve_device_id(telemetry_config(data, "edge-0"))
    text = str(info.value)
    assert info.value.key == "device.id"
    assert "'edge-0'" in text and "'cam-3'" in text and str(cert) in text
    assert "remove device.id" in text and "re-enroll" in text


def test_telemetry_without_a_certificate_says_the_box_is_not_enrolled(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(ConfigError) as info:
        resolve_device_id(telemetry_config(data, "cam-3"))  # a configured id does not stand in for a certificate
    assert info.value.key == "telemetry.cert"
    assert str(data / "keys/device.pem") in str(info.value)
    assert "not enrolled" in str(info.value) and "edge enroll --claim CODE" in str(info.value)


def test_jsonl_uses_the_configured_id_then_the_certificate_then_the_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    monkeypatch.setattr(edge.config.socket, "gethostname", lambda: "bench-2")
    configured = parse_config({"device": {"id": "lab-1", "data_dir": str(data)}})
    unset = parse_config({"device": {"data_dir": str(data)}})
    assert resolve_device_id(unset) == "bench-2"  # no certificate yet
    self_signed(data / "keys/device.pem", "cam-3")
    assert resolve_device_id(unset) == "cam-3"
    assert resolve_device_id(configured) == "lab-1"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("bench-2.lab.example", "bench-2.lab.example"),
        ("My Host (2)", "My-Host--2-"),
        ("_x", "x"),
        ("h" * 80, "h" * 64),
        ("---", FALLBACK_DEVICE_ID),
        ("", FALLBACK_DEVICE_ID),
    ],
)
def test_the_host_name_is_made_a_valid_device_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, expected: str
) -> None:
    monkeypatch.setattr(edge.config.socket, "gethostname", lambda: host)
    assert resolve_device_id(parse_config({"device": {"data_dir": str(tmp_path)}})) == expected


def test_a_configured_id_must_be_a_device_id() -> None:
    assert parse_config({}).device.id == ""
    with pytest.raises(ConfigError) as info:
        parse_config({"device": {"id": "devices/+/x"}})
    assert info.value.key == "device.id" and "[A-Za-z0-9]" in str(info.value)


# -- `edge run`, the real command line -----------------------------------------------------------------------------


def test_edge_run_refuses_a_box_configured_as_another_box(edge_cli, tmp_path: Path, pki) -> None:
    data = tmp_path / "data"
    enroll(data, pki, "cam-real")
    # The image's file names a box (as every box's did before): this box's certificate says otherwise.
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "cam-configured"\ndata_dir = "{data}"\n[sink]\nkind = "telemetry"\n', encoding="utf-8"
    )
    proc = edge_cli("run", "--config", str(path), "--frames", "1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cam-configured" in proc.stderr and "cam-real" in proc.stderr
    assert str(data / "keys" / "device.pem") in proc.stderr and "remove device.id" in proc.stderr
    assert not (data / "outbox.sqlite").exists()  # refused before anything was opened


def test_edge_run_on_a_box_not_enrolled_says_so(edge_cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = main_file(tmp_path, '[sink]\nkind = "telemetry"\n', data=data)
    proc = edge_cli("run", "--config", str(path), "--frames", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(data / "keys" / "device.pem") in proc.stderr and "edge enroll --claim CODE" in proc.stderr


def test_edge_run_takes_broker_from_the_dropin_and_id_from_the_certificate(edge_cli, tmp_path: Path, pki) -> None:
    # The whole point: an image's file without an id or a broker, a box enrolled as cam-e2e whose drop-in names its
    # broker. The broker is not there: the envelopes stay in the outbox, which says whose they are.
    data = tmp_path / "data"
    enroll(data, pki, "cam-e2e")
    path = main_file(
        tmp_path, '[source]\nkind = "synthetic"\n[sink]\nkind = "telemetry"\n[telemetry]\nhost = "broker.invalid"\n'
    )
    write_dropin(data, {"telemetry": {"host": "127.0.0.1", "port": free_port(), "drain_timeout_s": 0.2}})
    proc = edge_cli("run", "--config", str(path), "--frames", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = next(e for e in log_lines(proc.stderr) if e["msg"] == "service starting")
    assert start["device"] == "cam-e2e"
    assert inspect_outbox(data / "outbox.sqlite").device_id == "cam-e2e"


def test_edge_run_reads_the_dropin_and_runs_as_before_without_one(edge_cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = main_file(tmp_path, f'[source]\ncount = 3\n[sink]\npath = "{tmp_path / "image.jsonl"}"\n', data=data)
    proc = edge_cli("run", "--config", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "image.jsonl").read_text().splitlines()) == 3
    write_dropin(data, {"sink": {"path": str(tmp_path / "box.jsonl")}})
    proc = edge_cli("run", "--config", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "box.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "image.jsonl").read_text().splitlines()) == 3  # untouched by the second run
