"""``edge enroll``: enroll this box with a claim code (or renew its certificate), ending with its first envelope."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from edge.errors import ConfigError

__all__ = ["register"]

_MAX_CLAIM_FILE = 4096


def register(subparsers: Any) -> None:
    """Add ``edge enroll``.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
        "enroll",
        help="enroll this box with a claim code; renew its certificate",
        description="Generate the box's key on the box (0600; it never leaves), have the fleet's enrollment "
        "endpoint certify it, write the certificate, the fleet's CA and keys and the broker address under "
        "device.data_dir (the broker address into the per-box drop-in edge.toml there), and publish the box's "
        "first envelope until the fleet's receipt covers it. The endpoint is authenticated by the CA fingerprint in "
        "the claim. An interrupted enrollment is finished by running the same command again.\n\n"
        "Examples:\n  edge enroll --claim 'edge-claim://fleet.example.net:8443/...#...'\n"
        "  edge enroll --claim-file /boot/firmware/edge-claim.txt   (what the first-boot unit runs)\n"
        "  edge enroll --renew   (renew the certificate now; the service renews by itself)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--claim", metavar="CODE", help="the claim code (edge-claim://...)")
    what.add_argument(
        "--claim-file",
        metavar="FILE",
        action="append",
        help="read the claim code from FILE (e.g. on the boot partition); repeatable: the first that exists is "
        "used; the file is deleted after success where it can be",
    )
    what.add_argument("--renew", action="store_true", help="renew the certificate now (same key)")
    what.add_argument(
        "--renew-if-due", action="store_true", help="renew only when less than a third of its lifetime is left"
    )
    p.add_argument("--config", default=None, metavar="FILE", help="configuration (default: /etc/edge/edge.toml)")
    p.add_argument(
        "--device-id", metavar="ID", help="the id to enroll as when the claim pins none (default: box-<key>)"
    )
    p.add_argument(
        "--wait-approval",
        type=float,
        default=600.0,
        metavar="S",
        help="how long to wait for an operator's approval of a manual claim (default: %(default)s)",
    )
    p.add_argument(
        "--first-envelope-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the fleet's receipt of the first envelope; 0 skips it (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_enroll)


def _claim_file(args: argparse.Namespace) -> Path | None:
    """The first ``--claim-file`` that exists (the last one named when none does: its error names it)."""
    if not args.claim_file:
        return None
    paths = [Path(p) for p in args.claim_file]
    return next((p for p in paths if p.exists()), paths[-1])


def _claim_text(args: argparse.Namespace) -> str:
    path = _claim_file(args)
    if path is None:
        return str(args.claim)
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_CLAIM_FILE + 1)
    except OSError as e:
        raise ConfigError("--claim-file", str(path), f"a readable file holding a claim code ({e.strerror})") from e
    if len(data) > _MAX_CLAIM_FILE:
        raise ConfigError("--claim-file", str(path), f"a claim code of at most {_MAX_CLAIM_FILE} bytes")
    return data.decode("utf-8", "replace")


def _enroll(args: argparse.Namespace) -> int:
    from edge.config import DEFAULT_CONFIG_PATH, load_config  # noqa: PLC0415
    from edge.enrollment.procedure import enroll  # noqa: PLC0415
    from edge.log import configure  # noqa: PLC0415
    from edge.wire.onboard import ClaimError, parse_claim  # noqa: PLC0415

    config_path = Path(args.config) if args.config else DEFAULT_CONFIG_PATH
    cfg = load_config(config_path)
    configure(cfg.log.level, "text")
    started = time.monotonic()
    if args.renew or args.renew_if_due:
        return _renew(args, cfg)
    try:
        claim = parse_claim(_claim_text(args))
    except ClaimError as e:
        where = "--claim" if args.claim else f"--claim-file {_claim_file(args)}"
        raise ConfigError(where, "<claim code>", f"a claim code ({e})") from e
    result = enroll(cfg, claim, device_id=args.device_id, approval_wait_s=args.wait_approval)
    enrolled_s = time.monotonic() - started
    used = _claim_file(args)
    if used is not None:
        try:
            os.unlink(used)  # used and bound to this box's key: worthless, but no secret should lie about
        except OSError as e:
            print(f"edge: note: the used claim file {used} stays ({e.strerror}); it is worthless now", file=sys.stderr)
    body: dict[str, Any] = {
        "device_id": result.device_id,
        "did": result.did,
        "broker": result.broker,
        "certificate_not_after": _iso(result.not_after),
        "enrolled_s": round(enrolled_s, 3),
    }
    status = 0
    if args.first_envelope_timeout > 0:
        from edge.enrollment.first_envelope import publish_first_envelope  # noqa: PLC0415

        cfg = load_config(config_path)  # again: the drop-in now names the broker
        first = publish_first_envelope(cfg, device_id=result.device_id, timeout_s=args.first_envelope_timeout)
        body["first_envelope_receipted"] = first.receipted
        body["first_envelope_s"] = round(time.monotonic() - started, 3)
        if not first.receipted:
            body["first_envelope_detail"] = first.detail
            status = 1
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(
            f"enrolled as {result.device_id} ({result.did}); broker {result.broker}; certificate until "
            f"{body['certificate_not_after']}"
        )
        if "first_envelope_receipted" in body:
            if body["first_envelope_receipted"]:
                print(f"first envelope verified and stored by the fleet {body['first_envelope_s']:.2f} s after start")
            else:
                print(
                    f"edge: error: enrolled, but the fleet has not receipted the first envelope within "
                    f"{args.first_envelope_timeout:g} s ({body['first_envelope_detail']}); it stays in the outbox and "
                    "the service delivers it: check `edge telemetry status` and the broker address",
                    file=sys.stderr,
                )
    return status


def _renew(args: argparse.Namespace, cfg: Any) -> int:
    from cryptography import x509  # noqa: PLC0415

    from edge.enrollment.procedure import KeyFiles, certificate_times, renew, renewal_due  # noqa: PLC0415

    files = KeyFiles.of(cfg)
    if args.renew_if_due:
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                "telemetry.cert",
                str(files.cert),
                "the box's certificate: this box is not enrolled yet: run `edge enroll --claim CODE`",
            ) from None
        except (OSError, ValueError) as e:
            raise ConfigError("telemetry.cert", str(files.cert), f"the box's certificate ({e})") from e
        before, after = certificate_times(cert)
        if not renewal_due(before, after, time.time()):
            print(f"certificate valid until {_iso(after)}; renewal not due yet")
            return 0
    result = renew(cfg)
    if args.json:
        print(json.dumps({"device_id": result.device_id, "certificate_not_after": _iso(result.not_after)}, indent=2))
    else:
        print(f"renewed the certificate of {result.device_id}: valid until {_iso(result.not_after)}")
    return 0


def _iso(t: float) -> str:
    import datetime  # noqa: PLC0415

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")
