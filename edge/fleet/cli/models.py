"""``edge fleet models ...`` and ``edge fleet publishers ...``: the fleet's TUF model repository.

Registered into ``edge fleet`` through ``SUBCOMMANDS``; the global ``--dir`` option comes from there. The repository
itself is ``edge.fleet.models.repository``; serve ``<fleet dir>/repository/`` with any static HTTP server, or in a lab
with ``edge fleet models serve`` (``edge.fleet.models.serve``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError
from edge.fleet.cli._common import fleet_dir

if TYPE_CHECKING:
    from edge.fleet.models.repository import FleetRepository

__all__ = ["SUBCOMMANDS", "register_models", "register_publishers"]

# Files smaller than this publish in well under a second: no progress lines for them.
_PROGRESS_MIN_BYTES = 4 * 2**20


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(t: datetime.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _repo(args: argparse.Namespace) -> FleetRepository:
    from edge.fleet.models.freshness import hold_repository_lock  # noqa: PLC0415
    from edge.fleet.models.repository import FleetRepository  # noqa: PLC0415 -- tuf loads only for these commands

    # A running gateway re-signs the timestamp (edge.fleet.models.freshness): never between our load and writes.
    hold_repository_lock(fleet_dir(args))
    return FleetRepository.load(fleet_dir(args))


def _role_values(items: list[str] | None, option: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        role, sep, raw = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[role] = convert(raw)
        except ValueError:
            raise ConfigError(option, item, "ROLE=VALUE, e.g. root=2") from None
    return out


def _models_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


# -- models -----------------------------------------------------------------------------------------------------------


def register_models(sub: Any) -> None:
    """Add ``edge fleet models init|publish|list|refresh|keys rotate|root|serve``."""
    p = sub.add_parser(
        "models",
        help="the TUF model repository: init, publish, list, refresh, rotate keys, export the trusted root",
        description="The fleet's TUF repository of models (<fleet dir>/repository: serve it with any static HTTP "
        "server). Keep the root and targets keys (<fleet dir>/tuf/keys/root, .../targets) offline in production.",
    )
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    init = actions.add_parser("init", help="create the repository and the keys of its top-level roles")
    init.add_argument(
        "--threshold", action="append", metavar="ROLE=N", help="signatures a role needs (repeatable; default 1)"
    )
    init.add_argument(
        "--expiry",
        action="append",
        metavar="ROLE=DAYS",
        help="metadata lifetime (repeatable; roles root, targets, publishers, snapshot, timestamp)",
    )
    init.set_defaults(func=_init)

    pub = actions.add_parser(
        "publish",
        help="publish a model release signed by its publisher",
        description="Run the release's golden samples and latency budget on this machine with the real model (the "
        "box's health gate; --force skips it), copy the model (and its float variant and golden samples) into the "
        "repository, sign the publisher's role with --key, then a new snapshot and timestamp. Golden outputs "
        "missing from --golden are computed by running the model. A release that fails the check is not signed "
        "(exit 3). Example: edge fleet models publish v2.onnx --name digits --version 2.0.0 --publisher acme "
        "--key acme.pem --golden golden.npz --latency-budget-ms 20 --requires onnxruntime=1.20",
    )
    pub.add_argument("model", metavar="MODEL.onnx")
    pub.add_argument("--name", required=True)
    pub.add_argument("--version", required=True)
    pub.add_argument("--publisher", required=True)
    pub.add_argument("--key", required=True, metavar="P.pem", help="the publisher's private key")
    pub.add_argument("--float", dest="float_variant", metavar="FLOAT.onnx", help="float variant beside an int8 model")
    pub.add_argument("--golden", metavar="FILE", help="golden samples (.npz with inputs [and outputs])")
    pub.add_argument("--tolerance", type=float, default=0.05, help="golden tolerance (default: %(default)s)")
    pub.add_argument("--min-agreement", type=float, default=1.0, help="golden argmax agreement (default: %(default)s)")
    pub.add_argument("--latency-budget-ms", type=float, help="p50 latency the box must reach")
    pub.add_argument("--quantization", choices=("int8", "float"), help="default: from the model's input type")
    pub.add_argument(
        "--requires",
        type=_requirement,
        action="append",
        metavar="RUNTIME=VERSION",
        help="the oldest runtime a box may run it on: onnxruntime, edge or python (repeatable; a runtime not named "
        "keeps its default, this machine's onnxruntime major.minor and edge version). Example: "
        "--requires onnxruntime=1.20 for boxes whose image ships an older onnxruntime than this machine",
    )
    pub.add_argument(
        "--force",
        action="store_true",
        help="sign without first running the golden samples and latency budget on this machine (a release meant to "
        "fail on the boxes, or a budget only the box can judge)",
    )
    pub.add_argument("--json", action="store_true", help="print the manifest as JSON")
    pub.set_defaults(func=_publish)

    ls = actions.add_parser("list", help="list published releases")
    ls.add_argument("--name", help="one model")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)

    refresh = actions.add_parser(
        "refresh", help="sign a new snapshot and timestamp now (a running gateway does it before they expire)"
    )
    refresh.set_defaults(func=_refresh)

    keys_p = actions.add_parser("keys", help="key management of the top-level roles")
    key_actions = keys_p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    rotate = key_actions.add_parser("rotate", help="replace a top-level role's keys (new root version)")
    rotate.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    rotate.set_defaults(func=_rotate_key)

    root = actions.add_parser("root", help="write the latest root metadata: the trusted root to provision on boxes")
    root.add_argument("--out", required=True, metavar="FILE")
    root.set_defaults(func=_root)

    serve = actions.add_parser(
        "serve",
        help="serve the repository over HTTP (a lab without a web server)",
        description="Serve <fleet dir>/repository read-only over plain HTTP: only its files, no directory listings. "
        "Boxes verify everything with TUF, so plain HTTP is enough; in production use nginx, a CDN or object "
        "storage. Example: edge fleet models serve --listen 0.0.0.0:8080, then [ota] repository = "
        '"http://<this machine>:8080" on the boxes.',
    )
    serve.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="address to listen on (default: %(default)s)"
    )
    serve.set_defaults(func=_serve)


def _init(args: argparse.Namespace) -> int:
    from edge.fleet.models.repository import FleetRepository  # noqa: PLC0415

    thresholds = _role_values(args.threshold, "--threshold", int)
    expiry = _role_values(args.expiry, "--expiry", float)
    repo = FleetRepository.init(fleet_dir(args), now=_now(), thresholds=thresholds, expiry_days=expiry)
    print(f"TUF repository: {repo.repository_dir} (serve this directory)")
    print(f"keys: {repo.fleet_dir / 'tuf' / 'keys'} (keep root and targets offline in production)")
    return 0


def _progress_printer() -> Callable[[int, int], None]:
    shown = [-1]

    def progress(done: int, total: int) -> None:
        if total < _PROGRESS_MIN_BYTES:
            return
        tenth = done * 10 // total
        if tenth > shown[0]:
            shown[0] = tenth
            print(f"publishing: {tenth * 10}% ({done} of {total} bytes)", file=sys.stderr)

    return progress


# The runtimes a box reports (edge.ota.trial.installed_versions): a requirement on anything else fails every trial.
_RUNTIMES = ("onnxruntime", "edge", "python")


def _requirement(text: str) -> tuple[str, str]:
    """``RUNTIME=VERSION`` of ``models publish --requires``."""
    from edge.wire.errors import ManifestError  # noqa: PLC0415
    from edge.wire.manifest import version_key  # noqa: PLC0415

    runtime, sep, version = text.partition("=")
    if not sep or runtime not in _RUNTIMES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected RUNTIME=VERSION with RUNTIME one of {', '.join(_RUNTIMES)}"
        )
    try:
        version_key(version)
    except ManifestError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return runtime, version


def _publish(args: argparse.Namespace) -> int:
    from edge.fleet.models.repository import default_requires  # noqa: PLC0415
    from edge.identity.keys import load_private_key  # noqa: PLC0415

    repo = _repo(args)
    requires = {**default_requires(), **dict(args.requires)} if args.requires else None
    checked: list[Any] = []

    def check(manifest: Any, files: Any, golden: bytes | None) -> None:
        from edge.fleet.models.precheck import check_release  # noqa: PLC0415 -- onnxruntime

        checked.append(check_release(manifest, files, golden))

    if args.force:
        print("warning: --force: the release is signed without running its golden samples and latency budget here",
              file=sys.stderr)  # fmt: skip
    manifest = repo.publish(
        Path(args.model),
        name=args.name,
        version=args.version,
        publisher=args.publisher,
        publisher_key=load_private_key(args.key),
        now=_now(),
        golden=Path(args.golden) if args.golden else None,
        float_variant=Path(args.float_variant) if args.float_variant else None,
        tolerance=args.tolerance,
        min_agreement=args.min_agreement,
        latency_budget_ms=args.latency_budget_ms,
        quantization=args.quantization,
        requires=requires,
        progress=_progress_printer(),
        check=None if args.force else check,
    )
    if args.json:
        print(json.dumps(manifest.to_custom()["edge"], indent=2))
        return 0
    print(f"published {manifest.model_id} by {manifest.publisher}")
    print(f"  {manifest.path}  sha256 {manifest.sha256}  {manifest.length} bytes  {manifest.quantization}")
    print(f"  input {manifest.input.name} {manifest.input.dtype}{list(manifest.input.shape)}")
    if manifest.float_variant is not None:
        print(f"  float variant {manifest.float_variant.path}  {manifest.float_variant.length} bytes")
    if manifest.golden is not None:
        g = manifest.golden
        print(f"  golden {g.count} samples, tolerance {g.tolerance:g}, min agreement {g.min_agreement:g}")
    if manifest.latency_budget_ms is not None:
        print(f"  latency budget {manifest.latency_budget_ms:g} ms")
    print(f"  requires {', '.join(f'{k} >= {v}' for k, v in manifest.requires.items())}")
    if checked:
        r = checked[0]
        golden = f"golden max error {r.max_error:.3g}, agreement {r.agreement:.3g}; " if r.max_error is not None else ""
        print(f"  checked here: {golden}{r.variant} p50 {r.latency_ms:.3f} ms")
    return 0


def _list(args: argparse.Namespace) -> int:
    releases = _repo(args).releases(args.name)
    if args.json:
        print(json.dumps([m.to_custom()["edge"] for m in releases], indent=2))
        return 0
    header = ("MODEL", "PUBLISHER", "QUANT", "GOLDEN", "FLOAT", "SHA256")
    rows = [
        (m.model_id, m.publisher, m.quantization, str(m.golden.count if m.golden else "-"),
         "yes" if m.float_variant else "-", m.sha256[:16])
        for m in releases
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _refresh(args: argparse.Namespace) -> int:
    repo = _repo(args)
    repo.refresh(now=_now())
    expiries = repo.expiries()
    print(f"timestamp valid until {_iso(expiries['timestamp'])}, snapshot until {_iso(expiries['snapshot'])}")
    soon = _now() + datetime.timedelta(days=14)
    for role, t in sorted(expiries.items()):
        if t < soon and role not in ("timestamp", "snapshot"):
            print(f"warning: {role} metadata expires {_iso(t)}; re-sign it before then", file=sys.stderr)
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    keyids = _repo(args).rotate_key(args.role, now=_now())
    print(f"{args.role}: new key(s) {', '.join(keyids)}; the old ones are revoked and deleted")
    if args.role == "root":
        print("provision boxes with the new root only for new enrollments: enrolled boxes follow the chain")
    return 0


def _root(args: argparse.Namespace) -> int:
    from edge._fs import atomic_write  # noqa: PLC0415 -- not for edge --help

    out = Path(args.out)
    atomic_write(out, _repo(args).root_bytes())
    print(out)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal  # noqa: PLC0415

    from edge.fleet.models.repository import METADATA_DIR, REPOSITORY_DIR, RepositoryError  # noqa: PLC0415
    from edge.fleet.models.serve import RepositoryServer, parse_listen  # noqa: PLC0415

    host, port = parse_listen(args.listen)
    directory = fleet_dir(args) / REPOSITORY_DIR
    if not (directory / METADATA_DIR / "root.json").is_file():
        raise RepositoryError(f"no TUF repository in {directory}: create it with: edge fleet models init")
    server = RepositoryServer(directory, host, port)
    print(f"serving {directory} at {server.url} (read-only; Ctrl-C or SIGTERM stops)", flush=True)
    # SIGTERM (systemd, a test) ends the server like Ctrl-C: exit 0, the port released.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


# -- publishers -------------------------------------------------------------------------------------------------------


def register_publishers(sub: Any) -> None:
    """Add ``edge fleet publishers add|allow|list|rotate|remove|keygen``."""
    p = sub.add_parser(
        "publishers",
        help="the model publishers the fleet trusts (delegated TUF roles)",
        description="Each publisher signs its own releases with its own key; the fleet's targets role says which "
        "models it may publish.",
    )
    actions = p.add_subparsers(dest="publishers_command", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="trust a publisher's key for some models")
    add.add_argument("name", metavar="NAME")
    add.add_argument("key", metavar="KEY.pub")
    add.add_argument("--models", required=True, type=_models_list, metavar="A,B", help="models it may publish")
    add.set_defaults(func=_pub_add)

    allow = actions.add_parser(
        "allow",
        help="change the models an existing publisher may publish",
        description="--models +x,+y adds models to the publisher's list, --models=-x takes one off it (boxes then "
        "stop trusting its releases of x), --models x,y replaces the list. Example: "
        "edge fleet publishers allow acme --models +mobilenet",
    )
    allow.add_argument("name", metavar="NAME")
    allow.add_argument(
        "--models", required=True, metavar="[+|-]A,...", help="+NAME adds, -NAME removes, plain names replace"
    )
    allow.set_defaults(func=_pub_allow)

    ls = actions.add_parser("list", help="list publishers")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_pub_list)

    rotate = actions.add_parser("rotate", help="replace a publisher's key")
    rotate.add_argument("name", metavar="NAME")
    rotate.add_argument("key", metavar="KEY.pub")
    rotate.add_argument("--sign-key", metavar="NEW.pem", help="the new private key: re-sign the publisher's role now")
    rotate.set_defaults(func=_pub_rotate)

    remove = actions.add_parser("remove", help="stop trusting a publisher (and every release it signed)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(func=_pub_remove)

    keygen = actions.add_parser(
        "keygen",
        help="make a publisher key pair (on the publisher's machine; registers nothing)",
        description="Write NAME.pem (0600) and NAME.pub into DIR. Give NAME.pub to the fleet operator.",
    )
    keygen.add_argument("name", metavar="NAME")
    keygen.add_argument("--out", required=True, metavar="DIR")
    keygen.set_defaults(func=_pub_keygen)


def _pub_add(args: argparse.Namespace) -> int:
    from edge.identity.keys import load_public_key  # noqa: PLC0415

    repo = _repo(args)
    repo.add_publisher(args.name, load_public_key(args.key), args.models, now=_now())
    print(f"publisher {args.name} may publish: {', '.join(repo.publisher_models(args.name))}")
    return 0


def _pub_allow(args: argparse.Namespace) -> int:
    items = _models_list(args.models)
    signed = [item for item in items if item[0] in "+-"]
    if not items or len(signed) not in (0, len(items)):
        raise ConfigError("--models", args.models, "+A,+B to add, -A to remove, or A,B to replace the list (not mixed)")
    repo = _repo(args)
    before = set(repo.publisher_models(args.name))
    if signed:
        now = repo.allow_models(
            args.name,
            now=_now(),
            add=[m[1:] for m in items if m[0] == "+"],
            remove=[m[1:] for m in items if m[0] == "-"],
        )
    else:
        now = repo.allow_models(args.name, now=_now(), replace=items)
    print(f"publisher {args.name} may publish: {', '.join(now)}" + ("" if set(now) != before else " (unchanged)"))
    dropped = sorted(before - set(now))
    if dropped:
        print(f"warning: boxes no longer trust {args.name}'s releases of {', '.join(dropped)}", file=sys.stderr)
    return 0


def _pub_list(args: argparse.Namespace) -> int:
    repo = _repo(args)
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "keyids": list(role.keyids),
            "threshold": role.threshold,
            "models": repo.publisher_models(name),
            "metadata_version": repo.publisher_version(name),
            "releases": sum(m.publisher == name for m in repo.releases()),
        }
        for name, role in repo.publishers().items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}  models {','.join(r['models'])}  key {r['keyids'][0][:16]}  releases {r['releases']}")
    return 0


def _pub_rotate(args: argparse.Namespace) -> int:
    from edge.identity.keys import load_private_key, load_public_key  # noqa: PLC0415

    sign_key = load_private_key(args.sign_key) if args.sign_key else None
    _repo(args).rotate_publisher(args.name, load_public_key(args.key), now=_now(), resign_key=sign_key)
    note = "re-signed" if sign_key else "its releases verify again once it re-signs (its next publish)"
    print(f"publisher {args.name}: key replaced; {note}")
    return 0


def _pub_remove(args: argparse.Namespace) -> int:
    _repo(args).remove_publisher(args.name, now=_now())
    print(f"publisher {args.name} removed: boxes no longer trust its releases")
    return 0


def _pub_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from edge._fs import atomic_write  # noqa: PLC0415
    from edge.fleet.models._tuf_keys import private_pem, public_pem  # noqa: PLC0415
    from edge.fleet.models.repository import validate_publisher  # noqa: PLC0415
    from edge.identity.errors import KeyExistsError  # noqa: PLC0415

    name = validate_publisher(args.name)
    out = Path(args.out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem, pub = out / f"{name}.pem", out / f"{name}.pub"
    if pem.exists():
        raise KeyExistsError(pem)
    key = Ed25519PrivateKey.generate()
    atomic_write(pub, public_pem(key.public_key()))
    atomic_write(pem, private_pem(key), mode=0o600)
    print(f"private key: {pem} (keep it on the publisher's machine)\npublic key: {pub} (give it to the fleet)")
    return 0


# The sub-subcommands this module adds to ``edge fleet``.
SUBCOMMANDS: list[Callable[[Any], None]] = [register_models, register_publishers]
