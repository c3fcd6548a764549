"""The Debian package (tools/deb/build.py, docs/debian.md), built here for amd64 and arm64 with the cache in .cache/deb.

What a box owner gets from ``apt install ./edge_*.deb`` is checked on the real archives: the control fields, the
file list (the box without edge/fleet, the units byte for byte edge/data's, the Yocto layer's configuration and
tmpfiles, a conffile), reproducibility (owner root, every mtime SOURCE_DATE_EPOCH), every ELF file of the target's
machine, the packaged ``edge`` running from an unpacked tree on the system's Python 3.11, and dpkg installing the
package into a scratch root with its maintainer scripts (the user, /data/edge, both units enabled), upgrading it in
place and purging it without a trace.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tools" / "deb" / "build.py"
YOCTO_FILES = ROOT / "yocto" / "meta-edge" / "recipes-edge" / "edge" / "files"
SITE = "usr/lib/edge/lib/python3.11/site-packages"
SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # what the package's Depends brings on a box
UNITS = ("edge.service", "edge-enroll.service")
ELF_MACHINE = {"amd64": 62, "arm64": 183}  # EM_X86_64, EM_AARCH64
# Everything the package installs lives under one of these.
ALLOWED = (
    "usr/bin/edge",
    "usr/lib/edge/",
    "usr/lib/systemd/system/",
    "usr/lib/sysusers.d/edge.conf",
    "usr/lib/tmpfiles.d/edge.conf",
    "usr/share/edge/models/",
    "usr/share/doc/edge/",
    "usr/share/man/man1/edge.1.gz",
    "usr/share/bash-completion/completions/edge",
    "usr/share/zsh/vendor-completions/_edge",
    "usr/share/lintian/overrides/edge",
    "etc/edge/",
)

pytestmark = pytest.mark.slow


def project() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def build(arch: str, out: Path) -> Path:
    # zstd: fast to pack and unpack in a test; the archive's content is the same as with the default xz.
    proc = subprocess.run(
        [sys.executable, str(BUILD), "--arch", arch, "--out", str(out), "--compression", "zstd"],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,  # a cold cache downloads and compiles everything
    )
    assert proc.returncode == 0, proc.stderr[-8000:]
    deb = Path(proc.stdout.strip().splitlines()[-1])
    assert deb.name == f"edge_{project()['version']}_{arch}.deb" and deb.is_file(), proc.stdout
    return deb


@pytest.fixture(scope="module")
def amd64_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("amd64", tmp_path_factory.mktemp("deb-amd64"))


@pytest.fixture(scope="module")
def arm64_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("arm64", tmp_path_factory.mktemp("deb-arm64"))


def members(deb: Path) -> list[tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def control_member(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-I", str(deb), name], capture_output=True, text=True, check=True).stdout


def name_of(member: tarfile.TarInfo) -> str:
    return member.name.removeprefix("./")


def unpack(deb: Path, root: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def test_the_pins_cover_the_box_dependencies_and_agree_with_the_arm64_tier() -> None:
    def pins(path: Path) -> dict[str, str]:
        found = {}
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                found[re.sub(r"[-_.]+", "-", name).lower()] = version
        return found

    deb, qemu = pins(BUILD.parent / "requirements.txt"), pins(ROOT / "tools" / "qemu" / "requirements.txt")
    for requirement in [*project()["dependencies"], *project()["optional-dependencies"]["camera"]]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()
        assert name in deb, f"{requirement} (pyproject.toml) is not pinned in tools/deb/requirements.txt"
    for fleet_only in project()["optional-dependencies"]["fleet"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", fleet_only)[0]).lower()
        assert name not in deb, f"{name} is the fleet's, never the box's"
    differ = {n: (v, qemu[n]) for n, v in deb.items() if n in qemu and qemu[n] != v}
    assert not differ, f"tools/deb and tools/qemu pin different versions (deb, qemu): {differ}"


def test_control_fields_depends_and_maintainer_scripts(amd64_deb: Path) -> None:
    fields = subprocess.run(["dpkg-deb", "-f", str(amd64_deb)], capture_output=True, text=True, check=True).stdout
    control = dict(re.findall(r"^([A-Za-z-]+): (.*)$", fields, re.M))
    assert control["Package"] == "edge"
    assert control["Version"] == project()["version"]
    assert control["Architecture"] == "amd64"
    assert control["Maintainer"] and control["Section"] and control["Priority"] == "optional"
    depends = [d.strip() for d in control["Depends"].split(",")]
    # The system's CPython 3.11 alone: the private environment's compiled modules are cp311.
    assert "python3 (>= 3.11~)" in depends and "python3 (<< 3.12)" in depends
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends), depends
    assert "systemd" in depends
    assert not any(d.startswith(("python3-", "libpython")) for d in depends), "the Python dependencies are private"
    assert 50_000 < int(control["Installed-Size"]) < 1_000_000  # KiB
    assert control_member(amd64_deb, "conffiles") == "/etc/edge/edge.toml\n"
    for script in ("postinst", "prerm", "postrm"):
        text = control_member(amd64_deb, script)
        assert text == (BUILD.parent / "files" / script).read_text()
        subprocess.run(["sh", "-n"], input=text, text=True, check=True)
    md5 = control_member(amd64_deb, "md5sums")
    assert f"  {SITE}/edge/cli.py\n" in md5 and "etc/edge/edge.toml" not in md5  # conffiles are not listed


def test_file_list_is_the_box_without_the_fleet_and_matches_the_image(amd64_deb: Path, tmp_path: Path) -> None:
    entries = members(amd64_deb)
    names = [name_of(m) for m in entries if name_of(m) not in ("", ".")]
    assert names, "empty data archive"
    outside = [n for n in names if not any(n == a.rstrip("/") or n.startswith(a) for a in ALLOWED if a)]
    outside = [n for n in outside if not any(a.startswith(n + "/") for a in ALLOWED)]  # the parent directories
    assert not outside, outside[:20]
    assert not [n for n in names if "/fleet" in n], "edge/fleet must not be on a box"
    site_dists = {n.split("/")[len(SITE.split("/"))] for n in names if n.startswith(SITE + "/")}
    for fleet_dist in ("psycopg", "prometheus_client", "segno"):
        assert not any(d.startswith(fleet_dist) for d in site_dists), fleet_dist
    for needed in ("edge", "numpy", "onnxruntime", "cryptography", "paho", "cbor2", "tuf", "serial", "cobs"):
        assert needed in site_dists, needed
    assert any(re.fullmatch(r"n3_edge-[^/]+\.dist-info", d) for d in site_dists)

    root = unpack(amd64_deb, tmp_path / "root")
    for unit in UNITS:
        assert (root / "usr/lib/systemd/system" / unit).read_bytes() == (ROOT / "edge" / "data" / unit).read_bytes()
    assert (root / "usr/lib/tmpfiles.d/edge.conf").read_bytes() == (YOCTO_FILES / "edge-tmpfiles.conf").read_bytes()
    assert (root / "etc/edge/edge.toml").read_bytes() == (YOCTO_FILES / "edge.toml").read_bytes()
    sysusers = (root / "usr/lib/sysusers.d/edge.conf").read_text()
    assert re.search(r"^u edge - .* /data/edge /usr/sbin/nologin$", sysusers, re.M)
    assert re.search(r"^m edge dialout$", sysusers, re.M) and re.search(r"^m edge video$", sysusers, re.M)
    # The factory models: stored once in /usr/share/edge/models, the package's own copies link there.
    for model in sorted((ROOT / "edge" / "models").glob("*.onnx")):
        shared = root / "usr/share/edge/models" / model.name
        assert shared.read_bytes() == model.read_bytes()
        link = root / SITE / "edge" / "models" / model.name
        assert link.is_symlink() and link.resolve() == shared.resolve()
    launcher = root / "usr/bin/edge"
    assert launcher.stat().st_mode & 0o777 == 0o755
    # The manual page and the completions, generated from the box's parser (tools/gen_cli_docs.py --box).
    page = gzip.decompress((root / "usr/share/man/man1/edge.1.gz").read_bytes()).decode()
    assert page.startswith(".TH EDGE") and "edge run" in page and "edge ota update" in page
    assert not re.search(r"^\.SS \\fBedge (fleet|gateway)", page, re.M), "the box's page documents the fleet's verbs"
    assert re.search(r"^complete .* edge$", (root / "usr/share/bash-completion/completions/edge").read_text(), re.M)
    assert (root / "usr/share/zsh/vendor-completions/_edge").read_text().startswith("#compdef edge")
    assert (root / "usr/share/doc/edge/copyright").read_text().count("onnxruntime") >= 1
    # Every Python module of the package comes with its bytecode: a read-only /usr gets none written at run time.
    missing = [
        p for p in (root / SITE).rglob("*.py") if not (p.parent / "__pycache__" / f"{p.stem}.cpython-311.pyc").is_file()
    ]
    assert not missing, missing[:10]


def test_archive_is_reproducible_owned_by_root_and_sorted(amd64_deb: Path) -> None:
    epoch = int(subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout)  # fmt: skip
    entries = members(amd64_deb)
    assert {(m.uid, m.gid, m.uname, m.gname) for m in entries} == {(0, 0, "root", "root")}
    assert {m.mtime for m in entries} == {epoch}
    # dpkg-deb walks the tree in sorted order (each directory's names sorted), symbolic links last (so that their
    # targets exist when they are unpacked).
    files = [m.name for m in entries if not m.issym()]
    links = [m.name for m in entries if m.issym()]
    assert [m.name for m in entries] == files + links

    def walk_order(name: str) -> list[str]:
        return name.split("/")

    assert files == sorted(files, key=walk_order) and links == sorted(links, key=walk_order)
    modes = {m.mode & 0o7777 for m in entries if not m.issym()}
    assert modes <= {0o755, 0o644}, modes


def test_a_second_build_is_bit_identical(amd64_deb: Path, tmp_path: Path) -> None:
    # The stage is made anew (edge's bytecode compiled again, RECORD and the control files written again): the
    # same inputs give the same tree, and so the same bytes.
    again = build("amd64", tmp_path)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(amd64_deb.read_bytes()).digest()


def elf_machines(root: Path) -> dict[str, int]:
    found = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                head = f.read(20)
            if head[:4] == b"\x7fELF":
                found[str(p.relative_to(root))] = int.from_bytes(head[18:20], "little")
    return found


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_every_elf_file_is_built_for_the_target(arch: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    deb = request.getfixturevalue(f"{arch}_deb")
    machines = elf_machines(unpack(deb, tmp_path / "root"))
    assert any(n.startswith(f"{SITE}/edge/_native.") for n in machines), "no edge._native"
    assert any("onnxruntime" in n for n in machines)
    wrong = {n: m for n, m in machines.items() if m != ELF_MACHINE[arch]}
    assert not wrong, wrong
    native = next(n for n in machines if n.startswith(f"{SITE}/edge/_native."))
    triplet = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[arch]
    assert native.endswith(f"_native.cpython-311-{triplet}.so")


def test_arm64_and_amd64_packages_hold_the_same_files(amd64_deb: Path, arm64_deb: Path) -> None:
    def normalised(deb: Path) -> set[str]:
        return {name_of(m).replace("x86_64", "ARCH").replace("aarch64", "ARCH") for m in members(deb)}

    only = normalised(amd64_deb) ^ normalised(arm64_deb)
    # Wheels may differ in a few vendored files per platform; the box's own files may not.
    own = [n for n in only if not n.startswith(SITE + "/") or n.startswith((SITE + "/edge/", SITE + "/n3_edge"))]
    assert not own, own


def packaged_edge(root: Path) -> Path:
    """The unpacked package's launcher, with the system's python3.11 where the package's Depends puts it."""
    assert SYSTEM_PYTHON.exists(), f"{SYSTEM_PYTHON} (Debian's python3.11, the package's dependency) is missing"
    target = root / "usr/bin/python3.11"
    if not target.exists():
        target.symlink_to(SYSTEM_PYTHON)
    return root / "usr/bin/edge"


def run_edge(edge: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "EDGE_"))}
    env["EDGE_REQUIRE_NATIVE"] = "1"  # the packaged C extension, or an error
    return subprocess.run(
        [str(edge), *args], capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=120
    )


def test_packaged_edge_runs_on_the_system_python_from_an_unpacked_tree(amd64_deb: Path, tmp_path: Path) -> None:
    root = unpack(amd64_deb, tmp_path / "root")
    edge = packaged_edge(root)
    # From a directory holding a package named edge: the launcher must not import it.
    decoy = tmp_path / "cwd"
    (decoy / "edge").mkdir(parents=True)
    (decoy / "edge" / "__init__.py").write_text("raise SystemExit('imported the working directory')\n")

    proc = run_edge(edge, "--help", cwd=decoy)
    assert proc.returncode == 0, proc.stderr
    for verb in ("run", "enroll", "model", "keys", "ota", "telemetry"):
        assert verb in proc.stdout
    assert "fleet" not in proc.stdout and "gateway" not in proc.stdout, proc.stdout

    probe = subprocess.run(
        [str(root / "usr/lib/edge/bin/python3"), "-I", "-c",
         "import sys, edge, numpy, onnxruntime; from edge.inference import preprocess as p; "
         "print(sys.prefix, sys.base_prefix, edge.__file__, numpy.__file__, p.backend(), sys.version_info[:2], "
         "any('dist-packages' in s for s in sys.path))"],
        capture_output=True, text=True, check=True, cwd=decoy,
    ).stdout.split()  # fmt: skip
    prefix, base, edge_file, numpy_file, backend = probe[:5]
    assert Path(prefix) == root / "usr/lib/edge" and base == "/usr"
    assert Path(edge_file).is_relative_to(root / SITE) and Path(numpy_file).is_relative_to(root / SITE)
    assert backend.startswith("native-"), backend
    assert probe[-1] == "False", "the system's dist-packages must not be visible"

    # The packaged configuration (its factory model, found in the unpacked tree) and the documented example.
    data = tmp_path / "data"
    packaged = (root / "etc/edge/edge.toml").read_text()
    assert '"/usr/share/edge/models/digits-int8.onnx"' in packaged and 'data_dir = "/data/edge"' in packaged
    configs = {
        "packaged": packaged.replace('"/usr/share/edge/', f'"{root}/usr/share/edge/')
        .replace('"/data/edge"', f'"{data}"')
        .replace("fps = 2.0", "fps = 0"),
        "example": (ROOT / "docs" / "edge.example.toml")
        .read_text()
        .replace('data_dir = "/data/edge"', f'data_dir = "{data}"'),
    }
    factory = hashlib.sha256((root / "usr/share/edge/models/digits-int8.onnx").read_bytes()).hexdigest()
    for name, text in configs.items():
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text)
        proc = run_edge(edge, "run", "--config", str(cfg), "--frames", "5", cwd=decoy)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(records) == 5 and all(r["type"] == "inference" for r in records), (name, proc.stdout[-2000:])
        logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        start = next(e for e in logs if e["msg"] == "service starting")
        assert start["backend"].startswith("native-") and start["model_sha256"] == factory, start


def scratch_root(root: Path) -> Path:
    """An empty system for dpkg --root: its database, the base accounts (root, dialout, ...), the system Python."""
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "var/log", "etc", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("var/lib/dpkg/status", "var/lib/dpkg/available"):
        (root / f).touch()
    base = Path("/usr/share/base-passwd")
    (root / "etc/passwd").write_text((base / "passwd.master").read_text())
    (root / "etc/group").write_text((base / "group.master").read_text())
    accounts = [line.split(":")[0] for line in (root / "etc/passwd").read_text().splitlines()]
    groups = [line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()]
    (root / "etc/shadow").write_text("".join(f"{name}:*:19000:0:99999:7:::\n" for name in accounts))
    (root / "etc/gshadow").write_text("".join(f"{name}:*::\n" for name in groups))
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).chmod(0o640)
    packaged_edge(root)
    return root


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Chrootless: the maintainer scripts run with DPKG_ROOT set and must change only that root, as in mmdebstrap's
    # chrootless mode. The dependencies (python3, systemd, ...) are the host's: --force-depends.
    return subprocess.run(
        ["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", "--force-unsafe-io",
         f"--log={root}/var/log/dpkg.log", *args],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    found = {}
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        found[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else ("dir" if p.is_dir() else "file")
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root installs files owned by root and by the edge user")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="the postinst runs the host's systemd-sysusers")
def test_dpkg_installs_creates_the_user_enables_the_units_upgrades_and_purges(amd64_deb: Path, tmp_path: Path) -> None:
    root = scratch_root(tmp_path / "root")
    before = tree(root)
    groups_before = (root / "etc/group").read_text()

    proc = dpkg(root, "--install", str(amd64_deb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Status} ${Version}\\n${Conffiles}", "edge"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert status.startswith(f"install ok installed {project()['version']}"), status
    assert "/etc/edge/edge.toml " in status

    # The account: a system user edge, group edge, in dialout and video, home /data/edge, no login.
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("edge:"))
    uid, gid, home, shell = int(user[2]), int(user[3]), user[5], user[6]
    assert uid < 1000 and home == "/data/edge" and shell == "/usr/sbin/nologin", user
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    assert int(groups["edge"][2]) == gid
    assert "edge" in groups["dialout"][3].split(","), groups["dialout"]
    assert "edge" in groups["video"][3].split(","), groups["video"]
    # The state directory from tmpfiles.d: edge:edge 0700.
    st = (root / "data/edge").stat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (uid, gid)
    # Both units enabled (WantedBy=multi-user.target), as systemctl enable would link them.
    for unit in UNITS:
        link = root / "etc/systemd/system/multi-user.target.wants" / unit
        assert link.is_symlink() and os.readlink(link) == f"/usr/lib/systemd/system/{unit}", unit

    # The installed command runs (and, its bytecode shipped, writes nothing into the package's tree).
    proc = run_edge(root / "usr/bin/edge", "--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edge {project()['version']}", proc.stderr

    # An upgrade in place (the same version again: the configure of an upgrade) keeps everything and says nothing.
    proc = dpkg(root, "--install", str(amd64_deb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "etc/passwd").read_text().count("\nedge:") == 1
    assert all((root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink() for unit in UNITS)

    proc = dpkg(root, "--purge", "edge")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # dpkg keeps a directory that holds files of no package: only those this scratch root came with (in a real system
    # base-files owns them).
    for line in proc.stderr.splitlines():
        kept = re.fullmatch(r"dpkg: warning: while removing edge, directory '/(.*)' not empty so not removed", line)
        assert kept and kept[1] in before, proc.stderr
    after = tree(root)
    # What may stay: dpkg's own database and log, the account (Debian's practice) with its backups and the lock file
    # of the account databases, and empty directories of systemd's that the helper created.
    allowed = re.compile(
        r"var/lib/dpkg(/.*)?|var/log/dpkg\.log|etc/(passwd|group|shadow|gshadow)-?|etc/\.pwd\.lock"
        r"|var/lib/systemd(/deb-systemd-helper-(enabled|masked))?|etc/systemd(/system)?"
    )
    left = {p: kind for p, kind in after.items() if p not in before and not allowed.fullmatch(p)}
    assert not left, left
    assert not (root / "data").exists() and not (root / "etc/edge").exists() and not (root / "usr/lib/edge").exists()
    changed = {p for p in before if p not in after}
    assert not changed, changed
    assert "edge" not in groups_before.split("\n")[0]  # the seed was clean; the account is what the package made
