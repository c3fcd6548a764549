"""``edge fleet`` verbs for the fleet's identities: the CA, enrollment, the device list, revocation, suspension
and the broker's configuration.

Each verb is registered by one function in ``SUBCOMMANDS``; ``edge.fleet.cli`` adds them, with the verbs of
``data``, ``models`` and ``rollout``, under ``edge fleet``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.errors import ConfigError
from edge.fleet.cli._common import fleet_dir, iso_utc, load_ca, open_registry

__all__ = ["SUBCOMMANDS"]

_MAX_CSR_FILE_BYTES = 64 * 1024
# How a registry change reaches the broker (edge.fleet.pki.registry): live through a running gateway, else at start.
_APPLY_HINT = (
    "a running `edge gateway run` applies it to the broker within seconds; if none runs, restart the broker "
    "(systemctl restart mosquitto), which loads broker/dynsec.json"
)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not >= 1")
    return n


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_pair(out_dir: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    from edge._fs import atomic_write  # noqa: PLC0415

    out_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    cert, key = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    atomic_write(cert, cert_pem)
    atomic_write(key, key_pem, mode=0o600)
    return cert, key


# -- ca ---------------------------------------------------------------------------------------------------------------


def _register_ca(sub: Any) -> None:
    ca = sub.add_parser("ca", help="create the fleet CA; issue the broker's and the gateways' certificates")
    actions = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="create the fleet CA and the fleet command key",
        description="Write ca.key (0600), ca.pem, commands.key (0600) and commands.pub into the fleet directory, and "
        "an initial broker fragment. Refuses to replace an existing CA unless --force is given: a new CA orphans "
        "every certificate the old one issued, so every box must be enrolled again.",
    )
    init.add_argument("--name", default="edge-fleet-ca", help="the CA's common name (default: %(default)s)")
    init.add_argument("--days", type=_positive_int, default=3650, help="validity in days (default: %(default)s)")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=_ca_init)

    server = actions.add_parser(
        "issue-server",
        help="issue the broker's TLS server certificate",
        description="Write server.pem and server.key into DIR (default: <fleet dir>/broker, where the generated "
        "listener looks for them). The broker reads its key after dropping root for its own user, so the key is made "
        "readable by the broker's group (--broker-group, default mosquitto: mode 0640) when that group exists; "
        "otherwise it stays 0600 and the command says what to do.",
    )
    server.add_argument("--host", action="append", required=True, metavar="H", help="host name or IP (repeatable)")
    server.add_argument("--out-dir", metavar="DIR", help="where to write (default: <fleet dir>/broker)")
    server.add_argument("--days", type=_positive_int, default=825, help="validity in days (default: %(default)s)")
    server.add_argument(
        "--broker-group",
        default="mosquitto",
        metavar="GROUP",
        help="the group the broker runs as, given read access to the key (default: %(default)s, as on Debian)",
    )
    server.set_defaults(func=_ca_issue_server)

    client = actions.add_parser(
        "issue-client",
        help="issue a gateway's (or with --operator an operator's) client certificate and grant it its broker rights",
        description="Write NAME.pem and NAME.key (0600) into DIR, record NAME as a gateway identity "
        "(broker/gateways: shared telemetry, status, commands, the broker's access rules) or, with --operator, as an "
        "operator identity (broker/operators: commands and replies only, for `edge fleet command`), and rewrite the "
        "broker files. The broker binds the client id to the CN: every gateway process needs its own identity.",
    )
    client.add_argument("name", metavar="NAME", help="the identity (certificate CN = broker username = client id)")
    client.add_argument(
        "--operator", action="store_true", help="an operator identity for `edge fleet command`, not a gateway"
    )
    client.add_argument(
        "--out-dir", metavar="DIR", help="where to write (default: <fleet dir>/gateway, or <fleet dir>/operator)"
    )
    client.add_argument("--days", type=_positive_int, default=825, help="validity in days (default: %(default)s)")
    client.set_defaults(func=_ca_issue_client)


def _ca_init(args: argparse.Namespace) -> int:
    from edge.fleet.pki.ca import COMMANDS_PUBLIC_FILE, FleetCA  # noqa: PLC0415

    now = _now()
    ca = FleetCA.init(fleet_dir(args), name=args.name, days=args.days, force=args.force, now=now)
    with open_registry(args) as registry:
        fragment = registry.write_broker_fragment(ca, now=now)
    print(f"fleet CA {args.name!r}: {ca.cert_path}")
    print(f"command key: {ca.directory / COMMANDS_PUBLIC_FILE}")
    print(f"broker fragment: {fragment}")
    return 0


def _ca_issue_server(args: argparse.Namespace) -> int:
    from edge.fleet.pki.registry import BROKER_DIR  # noqa: PLC0415

    ca = load_ca(args)
    out = Path(args.out_dir) if args.out_dir else fleet_dir(args) / BROKER_DIR
    try:
        cert_pem, key_pem = ca.issue_server(args.host, now=_now(), days=args.days)
    except ValueError as e:
        raise ConfigError("--host", args.host, str(e)) from e
    cert, key = _write_pair(out, "server", cert_pem, key_pem)
    print(f"server certificate: {cert}\nserver key: {key}")
    shared, note = _share_with_group(key, args.broker_group)
    print(note, file=sys.stdout if shared else sys.stderr)
    return 0


def _share_with_group(path: Path, group: str) -> tuple[bool, str]:
    """Make ``path`` readable by ``group`` (chgrp, then 0640; never readable by anyone else on the way).

    mosquitto, started as root, drops to its own user before it loads certificates (measured with 2.0.11: a 0600
    root key fails with "Permission denied"), so the key must be the broker group's to read.

    Returns:
        (whether it was done, a one-line message saying what was done or what the operator must do).
    """
    import grp  # noqa: PLC0415 -- POSIX only, like the broker

    by_hand = f"sudo chgrp {group} {path} && sudo chmod 0640 {path}"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False, (
            f"warning: no group {group!r} on this host, so {path} stays 0600 (readable by its owner only); make it "
            f"readable by the broker's user (`--broker-group GROUP`, or e.g. `{by_hand}` on the broker's host)"
        )
    try:
        os.chown(path, -1, gid)
        os.chmod(path, 0o640)
    except OSError as e:
        return False, (
            f"warning: cannot give group {group!r} read access to {path} ({e.strerror}); it stays 0600 and the broker "
            f"cannot read it: run `{by_hand}`"
        )
    return True, f"server key: group {group!r}, mode 0640 (the broker reads it as its own user)"


def _ca_issue_client(args: argparse.Namespace) -> int:
    from edge.fleet.pki.registry import GATEWAY_DIR, OPERATOR_DIR  # noqa: PLC0415

    ca = load_ca(args)
    now = _now()
    out = Path(args.out_dir) if args.out_dir else fleet_dir(args) / (OPERATOR_DIR if args.operator else GATEWAY_DIR)
    with open_registry(args) as registry:
        # Refuses an enrolled device's id, or a name of the other kind, before anything is issued.
        (registry.add_operator if args.operator else registry.add_gateway)(args.name)
        cert, key = _write_pair(out, args.name, *ca.issue_client(args.name, now=now, days=args.days))
        fragment = registry.write_broker_fragment(ca, now=now)
    print(f"client certificate: {cert}\nclient key: {key}")
    kind = "operator" if args.operator else "gateway"
    print(f"{kind} identity {args.name!r} in {fragment.parent}: {_APPLY_HINT}", file=sys.stderr)
    return 0


# -- enroll, devices, revoke, broker-config ------------------------------------------------------------------------


def _register_enroll(sub: Any) -> None:
    p = sub.add_parser(
        "enroll",
        help="certify a device from its CSR, register it and write its bundle",
        description="Check the CSR (proof of possession, Ed25519, CN = a valid device id, SAN = its did:key), "
        "issue the device certificate, register the device, write devices/<id>/ (device.pem, fleet-ca.pem, "
        "fleet-commands.pub, fleet-receipts.pub: copy them into the box's keys directory) and rewrite the broker "
        "files. Prints the bundle's path. A running `edge gateway run` gives the box its broker rights within "
        "seconds; without one, restart the broker.",
    )
    p.add_argument("csr", metavar="CSR", help="the device's CSR (device.csr from `edge keys generate`)")
    p.add_argument("--days", type=_positive_int, default=825, help="certificate validity (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_enroll)


def _enroll(args: argparse.Namespace) -> int:
    from edge.fleet.pki.registry import (  # noqa: PLC0415
        BUNDLE_CA_FILE,
        BUNDLE_CERT_FILE,
        BUNDLE_COMMANDS_FILE,
        BUNDLE_RECEIPTS_FILE,
    )

    try:
        with open(args.csr, "rb") as f:
            csr = f.read(_MAX_CSR_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError("CSR", args.csr, f"a readable file ({e.strerror})") from e
    ca = load_ca(args)
    with open_registry(args) as registry:
        record = registry.enroll(csr, ca=ca, now=_now())
        bundle = registry.bundle_dir(record.device_id)
    if args.json:
        body = {
            "device_id": record.device_id,
            "did": record.did,
            "enrolled_at": iso_utc(record.enrolled_at),
            "bundle": str(bundle),
            "files": [
                str(bundle / n) for n in (BUNDLE_CERT_FILE, BUNDLE_CA_FILE, BUNDLE_COMMANDS_FILE, BUNDLE_RECEIPTS_FILE)
            ],
        }
        print(json.dumps(body, indent=2))
    else:
        print(bundle)
    print(f"enrolled {record.device_id} ({record.did}); {_APPLY_HINT}", file=sys.stderr)
    return 0


def _register_devices(sub: Any) -> None:
    p = sub.add_parser("devices", help="list enrolled devices (revoked ones included)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_devices)


def _devices(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        devices = registry.store.devices()
    rows = [
        {
            "device_id": d.device_id,
            "did": d.did,
            "state": "revoked" if d.revoked_at is not None else "active",
            "enrolled_at": iso_utc(d.enrolled_at),
            "revoked_at": iso_utc(d.revoked_at),
        }
        for d in devices
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len("DEVICE"), *(len(d.device_id) for d in devices)])
    print(f"{'DEVICE':<{width}}  STATE    ENROLLED                   DID")
    for r in rows:
        print(f"{r['device_id']:<{width}}  {r['state']:<7}  {r['enrolled_at']!s:<25}  {r['did']}")
    return 0


def _register_revoke(sub: Any) -> None:
    p = sub.add_parser(
        "revoke",
        help="revoke a device: out of the broker's access rules, into the CRL, its telemetry refused",
        description="Mark the device revoked (idempotent), then rewrite the broker's access rules without it and the "
        "CRL with its certificate. A running `edge gateway run` deletes it from the broker within seconds, which "
        "disconnects it and refuses it every topic (without one, restart the broker); reload the broker so that the "
        "CRL refuses its TLS handshake too.",
    )
    p.add_argument("device_id", metavar="ID", help="the device id")
    p.set_defaults(func=_revoke)


def _revoke(args: argparse.Namespace) -> int:
    ca = load_ca(args)
    with open_registry(args) as registry:
        record = registry.revoke(args.device_id, ca=ca, now=_now())
    print(
        f"revoked {record.device_id} at {iso_utc(record.revoked_at)}; a running `edge gateway run` deletes it from the "
        "broker within seconds, which disconnects it and refuses it every topic; if none runs, restart the broker "
        "(systemctl restart mosquitto). Reload the broker as well (systemctl reload mosquitto) so that the CRL "
        "refuses its TLS handshake."
    )
    return 0


def _register_resume(sub: Any) -> None:
    p = sub.add_parser(
        "resume",
        help="lift a device's suspension now (it was suspended for flooding the fleet with rejected messages)",
        description="A gateway suspends a box whose rejected messages overdraw its budget ([gateway] reject_burst, "
        "reject_per_s): its client is removed from the broker, so it can publish nothing, for suspend_s (doubled "
        "for each repeat within a day). This ends the suspension now; a running `edge gateway run` gives the box "
        "its client back within seconds. `edge fleet status` shows suspensions.",
    )
    p.add_argument("device_id", metavar="ID", help="the device id")
    p.set_defaults(func=_resume)


def _resume(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        if registry.store.device(args.device_id) is None:
            raise ConfigError("device", args.device_id, "an enrolled device (see `edge fleet devices`)")
        lifted = registry.store.resume(args.device_id, now=_now().timestamp())
    if lifted is None:
        print(f"{args.device_id} is not suspended; nothing to do")
        return 0
    print(
        f"lifted the suspension of {args.device_id} (since {iso_utc(lifted.since)}, strike {lifted.strikes}: "
        f"{lifted.reason}); a running `edge gateway run` lets it publish again within seconds"
    )
    return 0


def _register_broker_config(sub: Any) -> None:
    p = sub.add_parser(
        "broker-config",
        help="rewrite the mosquitto fragment (listener, access rules, CRL) from the registry",
        description="Rewrite broker/edge-fleet.conf (the broker settings the delivery guarantees need: persistence, "
        "queue and packet limits, session expiry, retained messages; then the listener), broker/dynsec.json (the "
        "dynamic-security plugin's state) and broker/crl.pem. Options given here are kept (broker/listener.json) for "
        "every later rewrite. "
        "Include the fragment from mosquitto.conf with `include_dir <fleet dir>/broker`; restart the broker after a "
        "listener change.",
    )
    p.add_argument("--port", type=_positive_int, help="the listener's TCP port (default 8883)")
    p.add_argument("--bind", metavar="ADDR", help="the address to listen on (default: every interface)")
    p.add_argument("--certfile", metavar="FILE", help="the broker's certificate (default: broker/server.pem)")
    p.add_argument("--keyfile", metavar="FILE", help="the broker's key (default: broker/server.key)")
    p.add_argument(
        "--dynsec-plugin",
        metavar="PATH",
        help="mosquitto's mosquitto_dynamic_security.so (default: found in /usr/lib/<multiarch>/ and the like)",
    )
    p.add_argument(
        "--persistence-location",
        metavar="DIR",
        help="write `persistence_location DIR` into the fragment, for a mosquitto.conf that sets none (Debian's sets "
        "/var/lib/mosquitto/, and mosquitto refuses a second one); DIR must be writable by the broker's user; "
        "'' removes it again (default: as recorded, initially none)",
    )
    p.set_defaults(func=_broker_config)


def _broker_config(args: argparse.Namespace) -> int:
    from edge.fleet.pki.registry import BrokerListener  # noqa: PLC0415

    ca = load_ca(args)
    with open_registry(args) as registry:
        given = (args.port, args.bind, args.certfile, args.keyfile, args.dynsec_plugin, args.persistence_location)
        if any(v is not None for v in given):
            old = registry.listener()
            if args.persistence_location is None:
                location = old.persistence_location
            else:
                location = Path(args.persistence_location).absolute() if args.persistence_location else None
            new = BrokerListener(
                port=args.port if args.port is not None else old.port,
                bind=args.bind if args.bind is not None else old.bind,
                certfile=Path(args.certfile).absolute() if args.certfile else old.certfile,
                keyfile=Path(args.keyfile).absolute() if args.keyfile else old.keyfile,
                dynsec_plugin=Path(args.dynsec_plugin).absolute() if args.dynsec_plugin else old.dynsec_plugin,
                persistence_location=location,
            )
            registry.dynsec_plugin(new)  # a missing plugin is refused before it is recorded
            registry.set_listener(new)
        fragment = registry.write_broker_fragment(ca, now=_now())
    print(fragment)
    print(
        f"access rules: {_APPLY_HINT}; a change of the listener or the broker settings needs a broker restart; "
        "check the result with `edge fleet doctor`",
        file=sys.stderr,
    )
    return 0


# -- registration -----------------------------------------------------------------------------------------------------

# The sub-subcommands of `edge fleet`, in help order; each adds its parser(s) to the `edge fleet` subparsers.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    _register_ca,
    _register_enroll,
    _register_devices,
    _register_revoke,
    _register_resume,
    _register_broker_config,
]
