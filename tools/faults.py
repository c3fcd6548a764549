"""The fault harness: real boxes, broker, gateways and stores, hit by faults at random, then checked for loss.

What runs (every process a real one, every socket on 127.0.0.1, all of it in one temporary directory):

- a fleet directory (CA, registry, receipt key) over the store of the run: SQLite (``<fleet>/fleet.db``) or
  PostgreSQL (a server of the harness's own: ``initdb`` into a temporary directory and ``pg_ctl`` on a free port,
  as the ``postgres`` user when run as root; the machine's server is never touched);
- mosquitto configured by the fleet's generated fragment, persistence on and its database in the harness's directory
  (a SIGTERM saves the queues; a SIGKILL loses what the last autosave did not hold, which costs a resend);
- two ``edge gateway run`` processes with their own identities in one shared-subscription group, receipts every
  0.1 s;
- K boxes, each ``edge run`` on the bundled digits model with the synthetic source paced by ``source.fps``,
  ``sink.kind = "telemetry"``, five records per envelope and ``telemetry.receipt_timeout_s = 2``;
- two TCP proxies between the clients and the broker (one for the boxes, one for the gateways) that the harness can
  cut: every connection through it is aborted and new ones are refused for 1-3 s ("the broker unreachable"; a
  network fault without root, iptables or a second host).

Faults, one at a time, chosen with a seeded ``random.Random`` and separated by 0.3-1.5 s of normal running:
``broker_kill`` (SIGKILL, restart), ``broker_term`` (SIGTERM, restart), ``gateway_kill`` (SIGKILL of either gateway,
restart), ``partition`` (cut the boxes' proxy, the gateways' or both for 1-3 s), ``box_kill`` (kill -9 of a box's
service, restart: its outbox survives) and, with PostgreSQL, ``pg_restart`` (``pg_ctl stop -m fast`` or
``-m immediate``, start). A process that exits on its own is restarted as a supervisor would, and counted.

``--fill-outbox``: the first box runs with ``outbox_max_envelopes = 20`` and ``max_unreceipted = 5``, and halfway the
harness stops both gateways until that box has dropped envelopes: the one case in which loss is allowed, and it must
be announced by a signed loss notice and counted in the ledger.

The end: every box is stopped (SIGTERM) and started again with a source that makes one frame and then nothing for
hours, so that each outbox can drain to empty through receipts; then the boxes and the gateways stop (SIGTERM).

The checker (``check``) reads each box's outbox file (read-only) and the store, and states per box:

- sealed = ``head.next_counter - 1``; every counter 1..sealed is stored (once: the store's key) or inside the range of
  a loss notice of a stored, signature-checked envelope; nothing is stored above ``sealed``; the stored chain links
  (each envelope's ``prev`` is the hash of the stored envelope before it);
- loss notices and dropped envelopes only on a box that filled its outbox on purpose; the ledger's
  ``announced_lost`` is at most the box's ``dropped_envelopes`` and not 0 when counters are lost (it is a lower
  bound: the ledger counts a notice only above the highest counter announced before, so a notice committed out of
  counter order adds nothing; reported as a note);
- no double credit: the ledger's envelopes equal the distinct stored envelopes, its inferences equal the inference
  records in them, and its ``missing`` equals the sealed counters not stored;
- the outbox is empty, and ``receipted + acked + dropped + corrupt`` equals ``sealed``.

Usage (from the repository root):

    .venv/bin/python tools/faults.py --faults 60 --store sqlite --boxes 3 --seed 1
    .venv/bin/python tools/faults.py --faults 1000 --store both --boxes 3 --seed 7   # the long mode
    .venv/bin/python tools/faults.py --faults 10 --store sqlite --fill-outbox --json

``--store both`` runs the faults twice, once per store, each run with its own fleet (a store per run: gateways of one
fleet share one store). Exit status 0 when the checker found nothing, 1 otherwise; ``--keep DIR`` keeps the run's files
(logs, outboxes, store) in DIR. The CI mode is ``tests/test_fault_harness.py`` (part of ``make test``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pwd
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: E402

from edge._fs import atomic_write  # noqa: E402
from edge.fleet.pki.ca import FleetCA  # noqa: E402
from edge.fleet.pki.registry import BrokerListener, Registry  # noqa: E402
from edge.fleet.store import open_store  # noqa: E402
from edge.identity.keys import generate_device_identity  # noqa: E402
from edge.wire.envelope import open_envelope  # noqa: E402
from edge.wire.records import InferenceRecord  # noqa: E402
from edge.wire.schema import LossNotice  # noqa: E402

__all__ = ["FAULT_KINDS", "BoxCheck", "CheckResult", "HarnessError", "Options", "RunResult", "boxes_in", "check", "run"]

EDGE = [sys.executable, "-m", "edge"]
GATEWAYS = ("gw-a", "gw-b")
CAMERAS = ("YUYV", "NV12", "RGB888")
FAULT_KINDS = ("broker_kill", "broker_term", "gateway_kill", "partition", "box_kill", "pg_restart")
FILL_MAX_ENVELOPES = 20
FILL_MAX_UNRECEIPTED = 5


class HarnessError(RuntimeError):
    """The harness itself could not do its job (a process would not start, a drain timed out)."""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def log_events(path: Path, msg: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``path`` whose ``msg`` is ``msg``."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{msg}"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                e = json.loads(line)
                if e.get("msg") == msg:
                    out.append(e)
    return out


# ----------------------------------------------------------------------------------------------------- processes


class Proc:
    """One child process with its log file; restartable."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> int:
        """Start it; returns the log's size before (where this run's lines begin)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.starts += 1
        return offset

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def term(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, offset: int = 0, n: int = 3000) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")[-n:]


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of the broker that the harness can cut.

    ``cut`` aborts every connection through it and closes its listening socket (clients get connection refused);
    ``heal`` listens again on the same port. TLS passes through untouched (the broker's certificate names 127.0.0.1).
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.connections = 0

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = {writer, up_writer}
        self._conns |= pair

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._conns -= pair

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def heal(self) -> None:
        if self._server is None:
            self._call(self._listen())

    def close(self) -> None:
        if not self._thread.is_alive():
            self._loop.close()
            return
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise HarnessError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    return found[-1].parent


class PostgresServer:
    """A PostgreSQL cluster of the harness's own on a free port of 127.0.0.1, to stop and start at will.

    As root it runs as the ``postgres`` user (initdb refuses root), in a directory that user owns (created apart from
    the harness's directory, which is private to root). fsync stays on: ``-m immediate`` is a crash and must recover.
    """

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="edge-faults-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise HarnessError(f"{Path(args[0]).name} failed: {proc.stderr.decode(errors='replace')[-2000:]}")

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def remove(self) -> None:
        if self.running:
            with contextlib.suppress(HarnessError, subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- the fleet


@dataclass
class Box:
    """A box: its data directory (keys, outbox, config) and its ``edge run`` process."""

    id: str
    dir: Path
    proc: Proc
    fill: bool = False

    @property
    def outbox(self) -> Path:
        return self.dir / "outbox.sqlite"

    @property
    def config(self) -> Path:
        return self.dir / "edge.toml"


@dataclass
class Options:
    """One run's settings (the CLI's flags)."""

    faults: int
    store: str  # "sqlite" or "postgres"
    boxes: int = 3
    seed: int = 1
    fill_outbox: bool = False
    fps: float = 20.0
    batch_records: int = 5
    gap_s: tuple[float, float] = (0.3, 1.5)
    drain_timeout_s: float = 240.0
    log: Callable[[str], None] = print


@dataclass
class RunResult:
    """What a run did and what the checker found."""

    store: str
    seed: int
    faults: dict[str, int]
    restarts: dict[str, int]
    duration_s: float
    boxes_stats: dict[str, dict[str, int]]
    gateway_duplicates: int
    check: CheckResult
    work: str = ""

    @property
    def injected(self) -> int:
        return sum(v for k, v in self.faults.items() if k != "fill")

    @property
    def ok(self) -> bool:
        return self.check.ok and not self.restarts.get("box_exited", 0)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["injected"] = self.injected
        d["ok"] = self.ok
        d["check"] = self.check.summary()
        return d


class Rig:
    """The processes of one run and the faults that hit them."""

    def __init__(self, work: Path, opts: Options) -> None:
        self.work = work
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.faults: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self.pg: PostgresServer | None = None
        self.fleet = work / "fleet"
        self.broker_port = free_port()
        self.box_proxy = CuttableProxy(self.broker_port)
        self.gw_proxy = CuttableProxy(self.broker_port)
        self.broker: Proc | None = None
        self.gateways: list[Proc] = []
        self.boxes: list[Box] = []
        self.store_url = ""

    # -- setup --------------------------------------------------------------------------------------------------

    def provision(self) -> None:
        """The fleet directory, its store, the broker fragment, gateway identities and enrolled boxes."""
        if self.opts.store == "postgres":
            self.pg = PostgresServer()
            self.pg.init()
            self.store_url = self.pg.url
        else:
            self.store_url = f"sqlite:///{self.fleet / 'fleet.db'}"
        ca = FleetCA.init(self.fleet, now=utcnow())
        store = open_store(self.store_url)
        try:
            registry = Registry(store, self.fleet)
            db = self.work / "mosquitto-db"
            db.mkdir()
            registry.set_listener(BrokerListener(port=self.broker_port, bind="127.0.0.1", persistence_location=db))
            cert, key = ca.issue_server(["127.0.0.1", "localhost"], now=utcnow(), days=30)
            atomic_write(self.fleet / "broker" / "server.pem", cert)
            atomic_write(self.fleet / "broker" / "server.key", key, mode=0o600)
            (self.fleet / "gateway").mkdir(exist_ok=True)
            for gw in GATEWAYS:
                registry.add_gateway(gw)
                cert, key = ca.issue_client(gw, now=utcnow(), days=30)
                atomic_write(self.fleet / "gateway" / f"{gw}.pem", cert)
                atomic_write(self.fleet / "gateway" / f"{gw}.key", key, mode=0o600)
            registry.write_broker_fragment(ca, now=utcnow())
            for i in range(self.opts.boxes):
                box_id = f"box-{i + 1}"
                data = self.work / "boxes" / box_id
                keys = data / "keys"
                ident = generate_device_identity(keys, box_id)
                record = registry.enroll(ident.csr.read_bytes(), ca=ca, now=utcnow())
                for f in registry.bundle_dir(record.device_id).iterdir():
                    shutil.copy(f, keys / f.name)
                box = Box(box_id, data, Proc(box_id, [], data / "edge.log"), fill=self.opts.fill_outbox and i == 0)
                box.proc.args = [*EDGE, "run", "--config", str(box.config)]
                self.write_box_config(box, i, drain=False)
                self.boxes.append(box)
        finally:
            store.close()
        run_as = "user root\n" if os.geteuid() == 0 else ""  # as root mosquitto would switch to a user without access
        conf = self.work / "mosquitto.conf"
        conf.write_text(
            f"{run_as}per_listener_settings false\nlog_dest file {self.work / 'mosquitto.log'}\n"
            f"log_type error\nlog_type warning\nlog_type notice\ninclude_dir {self.fleet / 'broker'}\n"
        )
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = Proc("mosquitto", [mosquitto, "-c", str(conf)], self.work / "mosquitto.out")
        for gw in GATEWAYS:
            toml = self.work / f"{gw}.toml"
            toml.write_text(
                f'[gateway]\nid = "{gw}"\nfleet_dir = "{self.fleet}"\nstore = "{self.store_url}"\n'
                'share_group = "ingest"\nreceipt_interval_s = 0.1\nstore_timeout_s = 120.0\n'
                f'[broker]\nhost = "127.0.0.1"\nport = {self.gw_proxy.port}\nca = "{self.fleet / "ca.pem"}"\n'
                f'cert = "{self.fleet / "gateway" / f"{gw}.pem"}"\nkey = "{self.fleet / "gateway" / f"{gw}.key"}"\n'
                '[metrics]\nenabled = false\n[rollout]\nenabled = false\n[log]\nlevel = "info"\n'
            )
            self.gateways.append(Proc(gw, [*EDGE, "gateway", "run", "--config", str(toml)], self.work / f"{gw}.log"))

    def write_box_config(self, box: Box, index: int, *, drain: bool) -> None:
        """The box's edge.toml; ``drain``: a source that makes one frame, then none for hours (0.0001 fps)."""
        fill = (
            f"outbox_max_envelopes = {FILL_MAX_ENVELOPES}\nmax_unreceipted = {FILL_MAX_UNRECEIPTED}\n"
            if box.fill
            else ""
        )
        fps = 0.0001 if drain else self.opts.fps
        box.config.write_text(
            f'[device]\nid = "{box.id}"\ndata_dir = "{box.dir}"\n'
            f'[source]\nkind = "synthetic"\npixel_format = "{CAMERAS[index % len(CAMERAS)]}"\nfps = {fps}\n'
            '[sink]\nkind = "telemetry"\n'
            f'[telemetry]\nhost = "127.0.0.1"\nport = {self.box_proxy.port}\n'
            f"batch_records = {self.opts.batch_records}\nbatch_age_s = 0.5\nreceipt_timeout_s = 2.0\n"
            f"drain_timeout_s = 1.0\n{fill}"
            '[log]\nlevel = "info"\n'
        )

    def start_broker(self) -> None:
        assert self.broker is not None
        offset = self.broker.start()
        if not wait_until(lambda: listening(self.broker_port) or not self.broker.alive, 15):  # type: ignore[union-attr]
            raise HarnessError(f"mosquitto did not listen: {self.broker.tail(offset)}")
        if not self.broker.alive:
            mlog = (self.work / "mosquitto.log").read_text(errors="replace")[-2000:]
            raise HarnessError(f"mosquitto exited: {self.broker.tail(offset)} {mlog}")

    def start_gateway(self, gw: Proc, timeout: float = 60.0) -> None:
        offset = gw.start()
        if not wait_until(lambda: not gw.alive or '"connected"' in gw.tail(offset, 10**7), timeout, 0.1):
            raise HarnessError(f"{gw.name} did not connect: {gw.tail(offset)}")
        if not gw.alive:
            raise HarnessError(f"{gw.name} exited: {gw.tail(offset)}")

    def start_box(self, box: Box, *, wait: bool = False, timeout: float = 60.0) -> None:
        """Start its service; ``wait``: until it is connected to the broker (a fault then hits a running box)."""
        offset = box.proc.start()
        if wait and not wait_until(
            lambda: not box.proc.alive or '"connected"' in box.proc.tail(offset, 10**7), timeout, 0.1
        ):
            raise HarnessError(f"{box.id} did not connect: {box.proc.tail(offset)}")

    def start(self) -> None:
        self.box_proxy.start()
        self.gw_proxy.start()
        self.start_broker()
        for gw in self.gateways:
            self.start_gateway(gw)
        for box in self.boxes:
            self.start_box(box)

    # -- faults -------------------------------------------------------------------------------------------------

    def kinds(self) -> list[str]:
        return [k for k in FAULT_KINDS if k != "pg_restart" or self.pg is not None]

    def inject(self, kind: str) -> str:
        """One fault; returns what it did."""
        rng = self.rng
        assert self.broker is not None
        if kind == "broker_kill":
            self.broker.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            self.start_broker()
            return "mosquitto SIGKILL, restarted"
        if kind == "broker_term":
            code = self.broker.term()
            time.sleep(rng.uniform(0.0, 1.0))
            self.start_broker()
            return f"mosquitto SIGTERM (exit {code}), restarted"
        if kind == "gateway_kill":
            gw = rng.choice(self.gateways)
            gw.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            self.start_gateway(gw)
            return f"{gw.name} SIGKILL, restarted"
        if kind == "partition":
            which = rng.choice(("boxes", "gateways", "both"))
            proxies = {"boxes": [self.box_proxy], "gateways": [self.gw_proxy]}.get(
                which, [self.box_proxy, self.gw_proxy]
            )
            seconds = rng.uniform(1.0, 3.0)
            for p in proxies:
                p.cut()
            time.sleep(seconds)
            for p in proxies:
                p.heal()
            return f"broker unreachable from the {which} for {seconds:.1f} s"
        if kind == "box_kill":
            box = rng.choice(self.boxes)
            box.proc.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            self.start_box(box, wait=True)
            return f"{box.id} kill -9, restarted"
        if kind == "pg_restart":
            assert self.pg is not None
            mode = rng.choice(("fast", "immediate"))
            self.pg.stop(mode)
            time.sleep(rng.uniform(0.0, 1.5))
            self.pg.start()
            return f"PostgreSQL stopped ({mode}), restarted"
        raise ValueError(f"unknown fault {kind!r}")

    def supervise(self) -> None:
        """Restart what exited on its own (as systemd would), counted; a box exiting is a finding."""
        assert self.broker is not None
        if not self.broker.alive:
            self.restarts["broker_exited"] += 1
            self.opts.log(f"  ! mosquitto exited by itself: {self.broker.tail(0, 500)}")
            self.start_broker()
        for gw in self.gateways:
            if not gw.alive:
                self.restarts["gateway_exited"] += 1
                code = gw.proc.returncode if gw.proc else None
                self.opts.log(f"  ! {gw.name} exited by itself ({code}); restarted")
                self.start_gateway(gw)
        for box in self.boxes:
            if not box.proc.alive:
                self.restarts["box_exited"] += 1
                code = box.proc.proc.returncode if box.proc.proc else None
                self.opts.log(f"  ! {box.id} exited by itself ({code}): {box.proc.tail(0, 1500)}")
                self.start_box(box)

    def fill_outbox(self) -> None:
        """Stop both gateways until the filling box has dropped envelopes from its full outbox; start them again."""
        box = next(b for b in self.boxes if b.fill)
        for gw in self.gateways:
            gw.term()
        start = outbox_state(box.outbox).get("dropped_envelopes", 0)
        if not wait_until(lambda: outbox_state(box.outbox).get("dropped_envelopes", 0) >= start + 10, 90, 0.2):
            raise HarnessError(f"{box.id} dropped nothing with the gateways away: {outbox_state(box.outbox)}")
        for gw in self.gateways:
            self.start_gateway(gw)
        self.faults["fill"] += 1
        self.opts.log(
            f"  fill: gateways stopped until {box.id} dropped {outbox_state(box.outbox)['dropped_envelopes']}"
        )

    def run_faults(self) -> None:
        kinds = self.kinds()
        fill_at = self.opts.faults // 2 if self.opts.fill_outbox else -1
        for i in range(self.opts.faults):
            time.sleep(self.rng.uniform(*self.opts.gap_s))
            self.supervise()
            if i == fill_at:
                self.fill_outbox()
            kind = self.rng.choice(kinds)
            t0 = time.monotonic()
            what = self.inject(kind)
            self.faults[kind] += 1
            self.opts.log(f"  fault {i + 1}/{self.opts.faults}: {what} ({time.monotonic() - t0:.1f} s)")
        time.sleep(self.rng.uniform(*self.opts.gap_s))
        self.supervise()

    # -- the end --------------------------------------------------------------------------------------------------

    def drain(self) -> dict[str, dict[str, int]]:
        """Stop the boxes, run each once more with a source that makes (almost) nothing until its outbox is empty,
        stop them; returns the boxes' closing counters summed over every clean stop (kill -9 logs none)."""
        self.box_proxy.heal()
        self.gw_proxy.heal()
        self.supervise()
        for box in self.boxes:
            code = box.proc.term(60)
            if code != 0:
                raise HarnessError(f"{box.id} exited with {code} on SIGTERM: {box.proc.tail(0)}")
        for rounds in range(3):
            for i, box in enumerate(self.boxes):
                self.write_box_config(box, i, drain=True)
                self.start_box(box, wait=True)
            time.sleep(1.5)  # the one frame of the idle source is sealed (batch_age_s 0.5 s) and in the outbox
            ok = wait_until(self._drained, self.opts.drain_timeout_s, 0.25)
            for box in self.boxes:
                code = box.proc.term(60)
                if code != 0:
                    raise HarnessError(f"{box.id} exited with {code} on SIGTERM: {box.proc.tail(0)}")
            left = {b.id: outbox_state(b.outbox).get("backlog_envelopes") for b in self.boxes}
            if ok and not any(left.values()):
                break
            self.opts.log(f"  drain round {rounds + 1}: outboxes not empty: {left}")
            if not ok:
                break
        totals: dict[str, dict[str, int]] = {}
        for box in self.boxes:
            t: Counter[str] = Counter()
            for e in log_events(box.proc.log, "service stopped"):
                for k in ("envelopes_sealed", "published", "receipted", "resent", "receipts_rejected"):
                    t[k] += int(e.get(k, 0))
            totals[box.id] = dict(t)
        return totals

    def _drained(self) -> bool:
        return all(outbox_state(b.outbox).get("backlog_envelopes", 1) == 0 for b in self.boxes)

    def stop(self) -> None:
        """Stop everything still running (gateways by SIGTERM first: they store and acknowledge what they hold)."""
        for gw in self.gateways:
            gw.term(30)
        for box in self.boxes:
            box.proc.term(30)
        if self.broker is not None:
            self.broker.term(15)
        self.box_proxy.close()
        self.gw_proxy.close()
        if self.pg is not None:
            self.pg.remove()


def boxes_in(work: Path) -> list[tuple[str, Path]]:
    """(device id, outbox file) of every box of a run kept in ``work`` (``run(..., keep=work)``)."""
    return [(d.name, d / "outbox.sqlite") for d in sorted((work / "boxes").iterdir()) if d.is_dir()]


def _row(conn: sqlite3.Connection, sql: str) -> dict[str, Any]:
    cur = conn.execute(sql)
    return dict(zip((d[0] for d in cur.description), cur.fetchone(), strict=True))


def outbox_state(path: Path) -> dict[str, int]:
    """A read-only look at a box's outbox: its head and delivery rows ({} if it does not exist yet)."""
    if not path.exists():
        return {}
    for _attempt in range(20):
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                head = _row(conn, "SELECT * FROM head WHERE id = 0")
                delivery = _row(conn, "SELECT * FROM delivery WHERE id = 0")
                rows = conn.execute("SELECT count(*) FROM envelopes").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.OperationalError:
            time.sleep(0.05)
            continue
        out = {k: v for k, v in {**delivery, **head}.items() if isinstance(v, int) and k != "id"}
        out["rows"] = int(rows)
        return out
    return {}


# ----------------------------------------------------------------------------------------------------- the checker


@dataclass
class BoxCheck:
    """The checker's findings for one box."""

    device_id: str
    sealed: int = 0
    stored: int = 0
    receipted: int = 0
    dropped: int = 0
    backlog: int = 0
    unstored: list[int] = field(default_factory=list)  # sealed counters the store lacks (dropped and announced)
    lost: list[int] = field(default_factory=list)  # sealed counters the store lacks and no loss notice covers
    notices: list[tuple[int, int]] = field(default_factory=list)  # loss notice ranges found in stored envelopes
    announced_lost: int = 0  # the ledger's count of dropped counters the box announced
    duplicates: int = 0  # copies the gateways received again and did not store (ledger)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # findings that are neither loss nor double credit


@dataclass
class CheckResult:
    boxes: list[BoxCheck]

    @property
    def ok(self) -> bool:
        return not any(b.problems for b in self.boxes)

    @property
    def problems(self) -> list[str]:
        return [f"{b.device_id}: {p}" for b in self.boxes for p in b.problems]

    def summary(self) -> dict[str, Any]:
        def brief(b: BoxCheck) -> dict[str, Any]:
            d = asdict(b)
            d["unstored"], d["lost"] = _ranges(b.unstored), _ranges(b.lost)
            return d

        return {"ok": self.ok, "boxes": [brief(b) for b in self.boxes], "problems": self.problems}


def _ranges(counters: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for c in sorted(counters):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def check(boxes: Sequence[tuple[str, Path]], store_url: str, *, loss_allowed: Collection[str] = ()) -> CheckResult:
    """Check every box's sealed chain against the store (see the module docstring for the rules).

    Args:
        boxes: (device id, outbox file) of every box; the boxes must be stopped.
        store_url: the fleet's store (the gateways should be stopped, or at least idle).
        loss_allowed: the boxes that filled their outbox on purpose: loss notices are allowed from them only.

    Returns:
        The findings per box; ``ok`` when there are no problems.
    """
    results = []
    store = open_store(store_url)
    try:
        for device_id, outbox in boxes:
            results.append(_check_box(store, device_id, outbox, device_id in loss_allowed))
    finally:
        store.close()
    return CheckResult(results)


def _check_box(store: Any, device_id: str, outbox: Path, loss_allowed: bool) -> BoxCheck:
    r = BoxCheck(device_id)
    state = outbox_state(outbox)
    if not state:
        r.problems.append(f"no outbox at {outbox}")
        return r
    r.sealed = state["next_counter"] - 1
    r.receipted = state["receipted_envelopes"]
    r.dropped = state["dropped_envelopes"]
    r.backlog = state["backlog_envelopes"]
    accounted = r.receipted + state["acked_envelopes"] + r.dropped + state["corrupt_rows"] + r.backlog
    if accounted != r.sealed:
        r.problems.append(
            f"outbox accounting: receipted {r.receipted} + acked {state['acked_envelopes']} + dropped {r.dropped} + "
            f"corrupt {state['corrupt_rows']} + backlog {r.backlog} = {accounted}, sealed {r.sealed}"
        )
    if r.backlog or state["rows"]:
        r.problems.append(f"outbox not empty at the end: {r.backlog} envelopes ({state['rows']} rows)")
    if state["corrupt_rows"]:
        r.problems.append(f"{state['corrupt_rows']} corrupt outbox rows")
    device = store.device(device_id)
    if device is None:
        r.problems.append("not in the store")
        return r
    key = Ed25519PublicKey.from_public_bytes(device.public_key)
    seen: Counter[int] = Counter()
    hashes: dict[int, bytes] = {}
    prevs: dict[int, bytes] = {}
    inferences = 0
    for stored in store.envelopes(device_id):
        seen[stored.counter] += 1
        try:
            env = open_envelope(stored.data, key)
        except Exception as e:  # any failure to verify is a finding, reported with its reason
            r.problems.append(f"stored envelope {stored.counter} does not verify: {e}")
            continue
        if env.counter != stored.counter or env.hash != stored.hash:
            r.problems.append(f"stored envelope {stored.counter} holds counter {env.counter} / another hash")
        hashes[env.counter], prevs[env.counter] = env.hash, env.prev
        for rec in env.records:
            if isinstance(rec, LossNotice) and rec.envelopes_dropped:
                r.notices.append((rec.first_counter, rec.last_counter))
            elif isinstance(rec, InferenceRecord):
                inferences += 1
    r.stored = len(seen)
    twice = sorted(c for c, n in seen.items() if n > 1)
    if twice:
        r.problems.append(f"stored more than once: {_ranges(twice)}")
    above = sorted(c for c in seen if c > r.sealed or c < 1)
    if above:
        r.problems.append(f"stored counters this box never sealed: {_ranges(above)}")
    broken = [c for c in sorted(prevs) if c - 1 in hashes and prevs[c] != hashes[c - 1]]
    if broken:
        r.problems.append(f"chain broken (prev is not the stored envelope before) at {_ranges(broken)}")
    r.unstored = [c for c in range(1, r.sealed + 1) if c not in seen]
    r.lost = [c for c in r.unstored if not any(lo <= c <= hi for lo, hi in r.notices)]
    if r.lost:
        r.problems.append(f"LOST: sealed, not stored, no loss notice: {_ranges(r.lost)}")
    if len(r.unstored) > r.dropped:
        r.problems.append(f"{len(r.unstored)} counters not stored but the box dropped only {r.dropped}")
    if not loss_allowed and (r.notices or r.dropped):
        r.problems.append(f"loss without a full outbox on purpose: dropped {r.dropped}, notices {r.notices}")
    rows = store.ledger(device_id=device_id)
    credited = sum(x.envelopes for x in rows)
    r.duplicates = sum(x.duplicates for x in rows)
    r.announced_lost = sum(x.announced_lost for x in rows)
    if credited != r.stored:
        r.problems.append(f"DOUBLE CREDIT or credit lost: the ledger counts {credited} envelopes, {r.stored} stored")
    claimed = sum(x.claimed for x in rows)
    if claimed != inferences:
        r.problems.append(f"the ledger claims {claimed} inferences, the stored envelopes hold {inferences}")
    missing = sum(x.missing for x in rows)
    if missing != len(r.unstored):
        r.problems.append(f"the ledger's missing is {missing}, {len(r.unstored)} sealed counters are not stored")
    if r.announced_lost > r.dropped:
        r.problems.append(f"the ledger's announced_lost is {r.announced_lost}, the box dropped only {r.dropped}")
    elif r.unstored and not r.announced_lost:
        r.problems.append(f"{len(r.unstored)} counters lost and announced, but the ledger counts no announced loss")
    elif r.announced_lost < r.dropped:
        # The ledger counts a notice only above the highest counter announced before (edge.fleet.store._batch): a
        # notice committed out of counter order (two gateways, a resend) or carried from a dropped envelope adds
        # nothing, so announced_lost is a lower bound. Not loss: every unstored counter is covered above.
        r.notes.append(f"the ledger's announced_lost is {r.announced_lost}, the box dropped {r.dropped}")
    return r


# ----------------------------------------------------------------------------------------------------- a run


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="edge-faults-") as tmp:
        yield Path(tmp)


def run(opts: Options, keep: Path | None = None) -> RunResult:
    """One run: provision, start, inject ``opts.faults`` faults, drain, stop, check.

    Args:
        opts: the run's settings.
        keep: a directory for the run's files, kept afterwards (None: a temporary directory, removed).

    Returns:
        The figures and the checker's findings.

    Raises:
        HarnessError: the harness could not run (a process would not start); every process is stopped anyway.
    """
    t0 = time.monotonic()
    with _workdir(keep) as work:
        rig = Rig(work, opts)
        try:
            opts.log(f"faults: {opts.store} store, {opts.boxes} boxes, seed {opts.seed}, in {work}")
            rig.provision()
            rig.start()
            time.sleep(2.0)
            rig.run_faults()
            opts.log("  draining: boxes restarted with an idle source until their outboxes are empty")
            totals = rig.drain()
            for gw in rig.gateways:
                gw.term(30)
            allowed = [b.id for b in rig.boxes if b.fill]
            result = check([(b.id, b.outbox) for b in rig.boxes], rig.store_url, loss_allowed=allowed)
        finally:
            rig.stop()
        return RunResult(
            store=opts.store,
            seed=opts.seed,
            faults=dict(rig.faults),
            restarts=dict(rig.restarts),
            duration_s=round(time.monotonic() - t0, 1),
            boxes_stats=totals,
            gateway_duplicates=sum(b.duplicates for b in result.boxes),
            check=result,
            work=str(work) if keep is not None else "",
        )


def report(r: RunResult) -> str:
    lines = [
        f"=== fault harness: {r.store} store, seed {r.seed}: {'PASS' if r.ok else 'FAIL'} in {r.duration_s:.0f} s",
        f"faults   {r.injected} injected: " + ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())),
    ]
    if r.restarts:
        lines.append("restarts " + ", ".join(f"{k} {v}" for k, v in sorted(r.restarts.items())))
    boxes = r.check.boxes
    lines.append(
        f"total    sealed {sum(b.sealed for b in boxes)}, stored {sum(b.stored for b in boxes)}, receipted "
        f"{sum(b.receipted for b in boxes)}, dropped {sum(b.dropped for b in boxes)}, lost "
        f"{sum(len(b.lost) for b in boxes)}; duplicates at the gateways {r.gateway_duplicates}; resent "
        f"{sum(s.get('resent', 0) for s in r.boxes_stats.values())} (clean stops only)"
    )
    for b in r.check.boxes:
        s = r.boxes_stats.get(b.device_id, {})
        lines.append(
            f"{b.device_id:<8} sealed {b.sealed}, stored {b.stored}, receipted {b.receipted}, dropped {b.dropped} "
            f"(announced {b.announced_lost}, notices {len(b.notices)}), lost {len(b.lost)}, duplicates at the "
            f"gateways {b.duplicates}; resent {s.get('resent', 0)} (clean stops only)"
        )
    lines += [f"note     {b.device_id}: {n}" for b in r.check.boxes for n in b.notes]
    lines += [f"PROBLEM  {p}" for p in r.check.problems]
    if r.restarts.get("box_exited"):
        lines.append("PROBLEM  a box's service exited by itself (see its edge.log)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fault harness: real processes, random faults, zero loss checked")
    ap.add_argument("--faults", type=int, default=60, help="faults per store (default: %(default)s)")
    ap.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    ap.add_argument("--boxes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill-outbox", action="store_true", help="box-1 fills its tiny outbox once: announced loss")
    ap.add_argument("--keep", type=Path, help="keep the run's files in this directory")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    stores = ("sqlite", "postgres") if args.store == "both" else (args.store,)
    results = []
    quiet = args.json
    for store in stores:
        opts = Options(
            faults=args.faults,
            store=store,
            boxes=args.boxes,
            seed=args.seed,
            fill_outbox=args.fill_outbox,
            log=(lambda _s: None) if quiet else (lambda s: print(s, flush=True)),
        )
        keep = None if args.keep is None else args.keep / store
        r = run(opts, keep)
        results.append(r)
        if not quiet:
            print(report(r), flush=True)
    if args.json:
        print(json.dumps([r.summary() for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
