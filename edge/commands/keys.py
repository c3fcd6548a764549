"""``edge keys``: create the device identity (Ed25519 key, did:key, CSR for the fleet CA)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``edge keys generate``.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    parser = subparsers.add_parser("keys", help="create the device identity")
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = sub.add_parser(
        "generate",
        help="generate an Ed25519 device key, its did:key and a CSR",
        description="Write device.key (0600), device.pub, device.did and device.csr into DIR. Refuses to replace an "
        "existing key unless --force is given.",
    )
    g.add_argument("--dir", required=True, metavar="DIR", help="key directory (created 0700 if missing)")
    g.add_argument("--device-id", required=True, metavar="ID", help="device id: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    g.add_argument("--force", action="store_true", help="replace an existing identity (the old key is lost)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from edge.identity import generate_device_identity  # noqa: PLC0415 -- cryptography loads only for this command

    ident = generate_device_identity(args.dir, args.device_id, force=args.force)
    paths = {
        "private_key": str(ident.private_key),
        "public_key": str(ident.public_key),
        "did_file": str(ident.did_file),
        "csr": str(ident.csr),
    }
    if args.json:
        print(json.dumps({"device_id": ident.device_id, "did": ident.did, **paths}, indent=2))
    else:
        print(ident.did)
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0
