"""Every error an operator can cause or meet, run as a real ``python -m edge`` process (docs/cli.md).

Each case asserts the whole contract: no traceback on stderr, the documented exit status (0 done, 2 usage or
configuration, 3 verification failed, 1 anything else), and a message that names the offending key, path, address or
package. The world the cases run in is made by the command line itself: a fleet CA, a box identity enrolled with it,
a ledger export, and configurations that are wrong in one way each. Faults are real: a regular file where a
directory should be (which stops root too, unlike chmod), a port another socket holds, a database and a broker port
nothing listens on, a package on PYTHONPATH whose import fails, /dev/full as stdout, a pipe closed by its reader.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edge(
    *args: str, env: dict[str, str] | None = None, stdout: int | object = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        stdout=stdout,  # type: ignore[arg-type]
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def must(*args: str) -> str:
    proc = edge(*args)
    assert proc.returncode == 0, f"edge {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@dataclass
class World:
    """Paths and ports the cases name (``{name}`` in a case's arguments and expectations)."""

    root: Path
    busy: socket.socket
    values: dict[str, str] = field(default_factory=dict)

    def fmt(self, text: str) -> str:
        return text.format(**self.values)


def _box_toml(data_dir: Path, sink: str, *, extra: str = "", telemetry: str = "") -> str:
    return f"""
[device]
data_dir = "{data_dir}"
[source]
kind = "synthetic"
count = 3
[sink]
{sink}
[telemetry]
host = "127.0.0.1"
port = {free_port()}
drain_timeout_s = 0
{telemetry}
{extra}
"""


def _gateway_toml(
    fleet: Path, *, broker_port: int, metrics_port: int, key: str = "gateway/gateway-1.key", store: str = ""
) -> str:
    return f"""
[gateway]
id = "gateway-1"
fleet_dir = "{fleet}"
store = "{store}"
[broker]
host = "127.0.0.1"
port = {broker_port}
ca = "ca.pem"
cert = "gateway/gateway-1.pem"
key = "{key}"
[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}
[rollout]
enabled = false
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("operator")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    w = World(root, busy)
    v = w.values
    v.update(root=str(root), busy=str(busy.getsockname()[1]), free=str(free_port()))

    # The fleet and one enrolled box, made as an operator makes them.
    fleet = root / "fleet"
    must("fleet", "--dir", str(fleet), "ca", "init")
    must("keys", "generate", "--dir", str(root / "box-keys"), "--device-id", "box-1")
    must("fleet", "--dir", str(fleet), "enroll", str(root / "box-keys" / "device.csr"))
    must("fleet", "--dir", str(fleet), "ca", "issue-client", "gateway-1")
    must("fleet", "--dir", str(fleet), "ca", "issue-client", "operator", "--operator")
    box = root / "box"
    (box / "keys").mkdir(parents=True)
    for f in (fleet / "devices" / "box-1").iterdir():
        shutil.copy2(f, box / "keys" / f.name)
    shutil.copy2(root / "box-keys" / "device.key", box / "keys" / "device.key")
    v.update(fleet=str(fleet), box=str(box))
    # A claim code for an enrollment endpoint nothing serves: the secret after "#" must never be printed.
    claim = must("fleet", "--dir", str(fleet), "claims", "create", "--server", f"127.0.0.1:{v['free']}").strip()
    v.update(claim=claim, claim_secret=claim.rpartition("#")[2])

    # A ledger export, then the same export claiming more work than its envelopes prove.
    export = root / "box-1.ledger"
    must("fleet", "--dir", str(fleet), "ledger", "--device", "box-1", "--export", str(export))
    header, *rest = export.read_text().splitlines()
    claims = json.loads(header)
    claims["totals"]["records"] += 17
    (root / "tampered.ledger").write_text("\n".join([json.dumps(claims), *rest]) + "\n")

    # Files in the way and files that are garbage.
    (root / "file").write_text("a regular file where a directory should be\n")
    (root / "dir.toml").mkdir()
    (root / "bad.toml").write_text("[model\nthreads = \n")
    (root / "bad.onnx").write_bytes(b"this is not a protobuf")
    (root / "bad.npz").write_bytes(b"PK\x03\x04 truncated zip")
    (root / "bad-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")

    # Packages whose import fails for real, as a broken or missing optional dependency does.
    for pkg, why in (("psycopg", "no pq wrapper available"), ("av", "libavformat.so.61: cannot open shared object")):
        (root / f"shadow-{pkg}" / pkg).mkdir(parents=True)
        (root / f"shadow-{pkg}" / pkg / "__init__.py").write_text(f"raise ImportError({why!r})\n")

    jsonl = 'kind = "jsonl"\npath = "{}"'
    configs = {
        "cfg_ok": _box_toml(root / "data-ok", jsonl.format(root / "out.jsonl")),
        "cfg_bad_value": _box_toml(root / "data-ok", jsonl.format(root / "out.jsonl"), extra="[model]\nthreads = 0"),
        "cfg_data_under_file": _box_toml(root / "file" / "sub", jsonl.format(root / "out.jsonl")),
        "cfg_sink_under_file": _box_toml(root / "data-ok", jsonl.format(root / "file" / "out.jsonl")),
        "cfg_model_missing": _box_toml(
            root / "data-ok", jsonl.format(root / "out.jsonl"), extra=f'[model]\npath = "{root}/absent.onnx"'
        ),
        "cfg_model_corrupt": _box_toml(
            root / "data-ok", jsonl.format(root / "out.jsonl"), extra=f'[model]\npath = "{root}/bad.onnx"'
        ),
        "cfg_npz_corrupt": _box_toml(root / "data-ok", jsonl.format(root / "out.jsonl")).replace(
            'kind = "synthetic"', f'kind = "npz"\npath = "{root}/bad.npz"'
        ),
        "cfg_stream": _box_toml(root / "data-ok", jsonl.format(root / "out.jsonl")).replace(
            'kind = "synthetic"', f'kind = "stream"\npath = "{root}/bad.npz"'
        ),
        "cfg_not_enrolled": _box_toml(root / "data-new", 'kind = "telemetry"'),
        "cfg_enroll": _box_toml(root / "data-enroll", 'kind = "telemetry"'),
        "cfg_ca_missing": _box_toml(box, 'kind = "telemetry"', telemetry='ca = "keys/absent-ca.pem"'),
        "cfg_ca_corrupt": _box_toml(box, 'kind = "telemetry"', telemetry=f'ca = "{root}/bad-ca.pem"'),
        "cfg_key_missing": _box_toml(box, 'kind = "telemetry"', telemetry='key = "keys/absent.key"'),
        "gw_down": _gateway_toml(fleet, broker_port=free_port(), metrics_port=free_port()),
        "gw_metrics_busy": _gateway_toml(fleet, broker_port=free_port(), metrics_port=busy.getsockname()[1]),
        "gw_store_down": _gateway_toml(
            fleet,
            broker_port=free_port(),
            metrics_port=free_port(),
            store=f"postgresql://u:secret@127.0.0.1:{v['free']}/x",
        ),
        "gw_key_missing": _gateway_toml(
            fleet, broker_port=free_port(), metrics_port=free_port(), key="gateway/absent.key"
        ),
    }
    for name, text in configs.items():
        (root / f"{name}.toml").write_text(text)
        v[name] = str(root / f"{name}.toml")
    (root / "data-ok").mkdir()
    (root / "data-new").mkdir()
    (root / "data-enroll").mkdir()
    yield w
    busy.close()


@dataclass(frozen=True)
class Case:
    """One fault: the arguments, the exit status, and what stderr must (``names``) and must not (``hides``) say."""

    id: str
    args: tuple[str, ...]
    status: int
    names: tuple[str, ...]
    hides: tuple[str, ...] = ()
    pythonpath: str = ""  # a directory of shadowing packages, put first on PYTHONPATH
    stdout: str = ""  # a file to write stdout to (/dev/full)


CASES = [
    # -- usage: the parser's own errors, and options out of range --------------------------------------------------
    Case("unknown-command", ("bogus",), 2, ("invalid choice: 'bogus'",)),
    Case("unknown-option", ("fleet", "--dir", "{fleet}", "status", "--bogus"), 2, ("--bogus",)),
    Case("negative-frames", ("run", "--config", "{cfg_ok}", "--frames", "-1"), 2, ("--frames",)),
    # -- configuration files ---------------------------------------------------------------------------------------
    Case("config-missing", ("run", "--config", "{root}/absent.toml"), 2, ("{root}/absent.toml",)),
    Case("config-is-a-directory", ("run", "--config", "{root}/dir.toml"), 2, ("{root}/dir.toml", "Is a directory")),
    Case("config-not-toml", ("run", "--config", "{root}/bad.toml"), 2, ("{root}/bad.toml", "TOML")),
    Case("config-bad-value", ("run", "--config", "{cfg_bad_value}"), 2, ("model.threads",)),
    # -- paths: a regular file where a directory should be (fails for root too), a full disk ---------------------
    Case("data-dir-under-a-file", ("run", "--config", "{cfg_data_under_file}"), 2, ("{root}/file/sub",)),
    Case(
        "sink-under-a-file",
        ("run", "--config", "{cfg_sink_under_file}"),
        1,
        ("{root}/file/out.jsonl", "Not a directory"),
    ),
    Case(
        "keys-dir-is-a-file",
        ("keys", "generate", "--dir", "{root}/file/keys", "--device-id", "box-9"),
        1,
        ("{root}/file/keys", "Not a directory"),
    ),
    Case(
        "fleet-dir-under-a-file",
        ("fleet", "--dir", "{root}/file/fleet", "ca", "init"),
        1,
        ("{root}/file/fleet", "Not a directory"),
    ),
    Case("stdout-disk-full", ("fleet", "--dir", "{fleet}", "devices"), 1, ("No space left",), stdout="/dev/full"),
    Case(
        "claim-file-missing",
        ("enroll", "--claim-file", "{root}/absent-claim.txt", "--config", "{cfg_not_enrolled}"),
        2,
        ("--claim-file", "{root}/absent-claim.txt"),
    ),
    # -- ports in use -------------------------------------------------------------------------------------------
    Case(
        "enroll-endpoint-port-in-use",
        ("fleet", "--dir", "{fleet}", "serve", "--listen", "127.0.0.1:{busy}"),
        1,
        ("127.0.0.1:{busy}", "--listen", "in use"),
    ),
    Case(
        "gateway-metrics-port-in-use",
        ("gateway", "run", "--config", "{gw_metrics_busy}"),
        1,
        ("127.0.0.1:{busy}", "metrics.port", "in use"),
    ),
    # -- optional dependencies ----------------------------------------------------------------------------------
    Case(
        "fleet-extra-missing",
        ("fleet", "--dir", "{fleet}", "--store", "postgresql://u:secret@127.0.0.1:{free}/x", "status"),
        1,
        ("psycopg", "n3-edge[fleet]"),
        hides=("secret",),
        pythonpath="{root}/shadow-psycopg",
    ),
    Case(
        "camera-extra-missing",
        ("run", "--config", "{cfg_stream}"),
        2,
        ("source.kind", "n3-edge[camera]"),
        pythonpath="{root}/shadow-av",
    ),
    # -- input files --------------------------------------------------------------------------------------------
    Case("model-missing", ("model", "inspect", "{root}/absent.onnx"), 1, ("{root}/absent.onnx",)),
    Case("model-corrupt", ("model", "inspect", "{root}/bad.onnx"), 1, ("{root}/bad.onnx",)),
    Case("configured-model-missing", ("run", "--config", "{cfg_model_missing}"), 1, ("{root}/absent.onnx",)),
    Case("configured-model-corrupt", ("run", "--config", "{cfg_model_corrupt}"), 1, ("{root}/bad.onnx",)),
    Case(
        "calibration-npz-corrupt",
        (
            "model",
            "quantize",
            str(ROOT / "edge/models/digits-fp32.onnx"),
            "{root}/q.onnx",
            "--calibration",
            "{root}/bad.npz",
        ),
        1,
        ("{root}/bad.npz",),
    ),
    Case("source-npz-corrupt", ("run", "--config", "{cfg_npz_corrupt}"), 1, ("{root}/bad.npz",)),
    Case(
        "ledger-export-missing",
        ("fleet", "--dir", "{fleet}", "ledger-verify", "{root}/absent.ledger"),
        1,
        ("{root}/absent.ledger",),
    ),
    Case(
        "outbox-missing",
        ("telemetry", "status", "--config", "{cfg_ok}"),
        1,
        ("{root}/data-ok/outbox.sqlite", "telemetry.outbox"),
    ),
    # -- services that are down ---------------------------------------------------------------------------------
    Case(
        "postgres-down",
        ("fleet", "--dir", "{fleet}", "--store", "postgresql://u:secret@127.0.0.1:{free}/x", "status"),
        1,
        ("postgresql://u:***@127.0.0.1:{free}/x",),
        hides=("secret",),
    ),
    Case(
        "gateway-store-down",
        ("gateway", "run", "--config", "{gw_store_down}"),
        1,
        ("postgresql://u:***@127.0.0.1:{free}/x",),
        hides=("secret",),
    ),
    Case(
        "broker-down",
        ("fleet", "command", "--config", "{gw_down}", "box-1", "ping", "--wait", "1"),
        1,
        ("broker.host", "broker.port", "{gw_down}"),
    ),
    Case(
        "enrollment-endpoint-down",
        ("enroll", "--claim", "{claim}", "--config", "{cfg_enroll}"),
        1,
        ("127.0.0.1:{free}",),
        hides=("{claim_secret}",),
    ),
    Case(
        "renewal-before-enrollment",
        ("enroll", "--renew-if-due", "--config", "{cfg_not_enrolled}"),
        2,
        ("telemetry.cert", "{root}/data-new/keys/device.pem", "edge enroll --claim"),
    ),
    # -- the box's identity: not enrolled, and each of the three TLS files named by its own key ----------------
    Case("box-not-enrolled", ("run", "--config", "{cfg_not_enrolled}"), 2, ("telemetry.cert", "edge enroll")),
    Case("tls-ca-missing", ("run", "--config", "{cfg_ca_missing}"), 2, ("telemetry.ca", "{box}/keys/absent-ca.pem")),
    Case("tls-ca-corrupt", ("run", "--config", "{cfg_ca_corrupt}"), 2, ("telemetry.ca", "{root}/bad-ca.pem")),
    Case(
        "tls-key-missing",
        ("run", "--config", "{cfg_key_missing}"),
        2,
        ("telemetry.key", "{box}/keys/absent.key", "edge enroll"),
    ),
    Case(
        "gateway-tls-key-missing",
        ("gateway", "run", "--config", "{gw_key_missing}"),
        2,
        ("broker.key", "{fleet}/gateway/absent.key"),
    ),
    # -- verification -------------------------------------------------------------------------------------------
    Case(
        "ledger-tampered",
        ("fleet", "--dir", "{fleet}", "ledger-verify", "{root}/tampered.ledger"),
        3,
        ("{root}/tampered.ledger", "does not verify"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_operator_error(world: World, case: Case) -> None:
    args = [world.fmt(a) for a in case.args]
    env = {"PYTHONPATH": world.fmt(case.pythonpath)} if case.pythonpath else None
    if case.stdout:
        with open(case.stdout, "w") as out:
            proc = edge(*args, env=env, stdout=out)
    else:
        proc = edge(*args, env=env)
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == case.status, f"exit {proc.returncode}, expected {case.status}: {err}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("edge: "), err  # the error is the last line, after any log lines
    for name in case.names:
        assert world.fmt(name) in err, f"{world.fmt(name)!r} not named: {err}"
    for secret in case.hides:
        assert world.fmt(secret) not in err + (proc.stdout or ""), err


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 25
    assert {c.status for c in CASES} == {1, 2, 3}


@pytest.mark.parametrize(
    "args", [("fleet", "--dir", "{fleet}", "status"), ("fleet", "--dir", "{fleet}", "devices", "--json"), ("--help",)]
)
def test_a_closed_pipe_ends_quietly(world: World, args: tuple[str, ...]) -> None:
    """``edge fleet status | head``: the reader is gone before the first write; exit 0, nothing on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", *(world.fmt(a) for a in args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the only read end: every write the command makes fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(TIMEOUT_S) == 0, err
    assert err == ""


def test_interrupt_exits_130_without_a_traceback(world: World) -> None:
    """Ctrl-C while a command waits (here for a broker that is down): status 130, as shells report SIGINT."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "fleet", "command", "--config", world.values["gw_down"], "box-1", "ping"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    # Its first line on stderr is the first failed connection attempt: by then it is waiting in the command (for up
    # to 10 s), past the imports, where an interrupt is the operator's and not the interpreter's start-up.
    first = proc.stderr.readline()
    assert proc.poll() is None, first
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_edge_debug_shows_the_traceback(world: World) -> None:
    """EDGE_DEBUG=1 adds the traceback before the same one line and the same status."""
    quiet = edge("run", "--config", world.fmt("{root}/absent.toml"))
    loud = edge("run", "--config", world.fmt("{root}/absent.toml"), env={"EDGE_DEBUG": "1"})
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip().splitlines()[-1]


def test_a_bug_in_a_systemd_service_leaves_its_traceback_in_the_journal(tmp_path: Path) -> None:
    """A real process with a planted bug (a dependency whose import raises RuntimeError): at a terminal one line; under
    systemd (INVOCATION_ID) the traceback first, for the bug report, and the same line last, the same status."""
    shadow = tmp_path / "shadow" / "cbor2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise RuntimeError("planted bug")\n')
    # Whatever runs these tests (a CI job may itself be a systemd service) decides nothing: both variables are set here.
    base = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "EDGE_DEBUG")}
    base["PYTHONPATH"] = str(shadow.parent)
    cmd = [sys.executable, "-m", "edge", "telemetry", "status", "--config", str(ROOT / "docs" / "edge.example.toml")]

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=ROOT, env=env)

    terminal = run(base)
    service = run({**base, "INVOCATION_ID": "0123456789abcdef0123456789abcdef"})
    assert terminal.returncode == service.returncode == 1, (terminal.stderr, service.stderr)
    line = "edge: internal error: RuntimeError: planted bug (this is a bug; rerun with EDGE_DEBUG=1 for the traceback)"
    assert terminal.stderr.strip() == line
    assert "Traceback" in service.stderr and "planted bug" in service.stderr
    assert service.stderr.strip().splitlines()[-1] == line
    # Only a bug: a configuration error in a service stays one line.
    config = edge("run", "--config", str(tmp_path / "absent.toml"), env={"INVOCATION_ID": "0" * 32})
    assert config.returncode == 2 and "Traceback" not in config.stderr


def test_a_bug_is_one_line_that_says_so() -> None:
    """An exception edge did not mean to raise: "internal error", a bug, and how to get the traceback; status 1."""
    from edge._cli_errors import report  # noqa: PLC0415

    status, line = report(RuntimeError("illegal transition idle -> committed"))
    assert status == 1
    assert line == (
        "internal error: RuntimeError: illegal transition idle -> committed "
        "(this is a bug; rerun with EDGE_DEBUG=1 for the traceback)"
    )
    assert report(KeyError("x"))[1].startswith("internal error: KeyError: 'x'")
