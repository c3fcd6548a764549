"""``edge fleet doctor``: checks a fleet directory and its running broker against what the delivery guarantees need.

Each check returns ``Finding`` values (severity, what, detail, fix); nothing here prints or exits. The checks proper
are sans-IO: they take the text or bytes of a file and an explicit ``now`` (``check_settings``, ``check_fragment``,
``check_certificate``, ``check_crl``, ``check_timestamp``, ``session_finding``). ``diagnose`` alone reads files,
stats directories and talks to the broker, and turns every missing or unreadable file into a finding, never an
exception.

This package is that I/O shell and the public surface; the checks live in one module per job: ``_findings`` (the
``Finding`` type), ``_conf`` (the mosquitto configuration and what "lossless" needs from it), ``_pki`` (certificates,
CRL, the TUF timestamp) and ``_session`` (the gateway-session probe, which connects only with ``connect=True``).
"""

from __future__ import annotations

import datetime
import grp
import json
import pwd
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509

from edge.errors import ConfigError
from edge.fleet.doctor._conf import ConfOption, check_fragment, check_settings, parse_conf
from edge.fleet.doctor._findings import Finding, Severity
from edge.fleet.doctor._findings import ok as _ok
from edge.fleet.doctor._pki import CERT_WARN_DAYS, check_certificate, check_crl, check_timestamp
from edge.fleet.doctor._session import (
    SessionProbe,
    connect_packet,
    parse_connack,
    probe_session,
    session_finding,
)
from edge.fleet.models.repository import METADATA_DIR, REPOSITORY_DIR
from edge.fleet.pki.ca import CA_CERT_FILE
from edge.fleet.pki.registry import (
    BROKER_DIR,
    CRL_FILE,
    DEFAULT_GATEWAY_IDS,
    FRAGMENT_FILE,
    GATEWAY_DIR,
    GATEWAYS_FILE,
    BrokerListener,
    dynsec_plugin_candidates,
    load_listener,
    render_fragment,
)

__all__ = [
    "CERT_WARN_DAYS",
    "DEFAULT_SESSION_EXPIRY_S",
    "ConfOption",
    "Finding",
    "SessionProbe",
    "Severity",
    "check_certificate",
    "check_crl",
    "check_fragment",
    "check_settings",
    "check_timestamp",
    "connect_packet",
    "diagnose",
    "exit_code",
    "parse_conf",
    "parse_connack",
    "probe_session",
    "read_broker_conf",
    "render",
    "session_finding",
]

DEFAULT_SESSION_EXPIRY_S: Final = 86400  # the gateway's default session_expiry_s (edge.fleet.config)
_MAX_FILE_BYTES: Final = 1 << 20


def _read(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise OSError(f"larger than {_MAX_FILE_BYTES} bytes")
    return data


def _missing(what: str, path: Path, e: OSError, fix: str, severity: Severity = "ERROR") -> Finding:
    why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror or e})"
    return Finding(severity, what, f"{path} is {why}", fix)


def read_broker_conf(path: Path) -> tuple[list[ConfOption], list[Path], list[Finding]]:
    """Read a mosquitto.conf and the ``*.conf`` files of its ``include_dir`` lines, in mosquitto's order.

    Returns:
        (the options, the included files, findings for what could not be read).
    """
    findings: list[Finding] = []
    try:
        text = _read(path).decode("utf-8", "replace")
    except OSError as e:
        return [], [], [_missing("broker config", path, e, "pass the mosquitto.conf the broker runs with")]
    options: list[ConfOption] = []
    included: list[Path] = []
    for o in parse_conf(text, str(path)):
        if o.key != "include_dir":
            options.append(o)
            continue
        directory = Path(o.value)
        try:
            # mosquitto sorts case-sensitively, upper case before the lower case of the same letter.
            files = sorted(
                (p for p in directory.iterdir() if p.name.endswith(".conf")),
                key=lambda p: [(c.lower(), c.islower()) for c in p.name],
            )
        except OSError as e:
            findings.append(_missing("broker include_dir", directory, e, f"fix {o.source}: mosquitto refuses to start"))
            continue
        for f in files:
            try:
                options.extend(parse_conf(_read(f).decode("utf-8", "replace"), str(f)))
                included.append(f)
            except OSError as e:
                findings.append(_missing("broker config", f, e, "make it readable"))
    return options, included, findings


def _broker_user(options: Sequence[ConfOption]) -> str:
    user = "mosquitto"  # mosquitto's default when started as root (Debian's unit starts it as root)
    for o in options:
        if o.key == "user":
            user = o.value
    return user


def _can(path: Path, user: str, bit_owner: int, bit_group: int, bit_other: int) -> bool | None:
    """Whether ``user`` has the permission on ``path`` by its mode (None: no such user here)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    st = path.stat()
    if pw.pw_uid == 0:
        return True
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & bit_owner)
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_gid in groups:
        return bool(st.st_mode & bit_group)
    return bool(st.st_mode & bit_other)


def _check_location(location: str, user: str) -> Finding:
    what = "broker persistence directory"
    path = Path(location)
    fix = f"create it and give it to the broker's user: `install -d -o {user} {path}`"
    if not path.is_dir():
        return Finding("ERROR", what, f"{path} is not a directory: mosquitto cannot save (it only logs)", fix)
    writable = _can(path, user, stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
    if writable is None:
        return _ok(what, f"{path} exists (no user {user!r} on this host: its rights not checked)")
    if not writable:
        return Finding("ERROR", what, f"{path} is not writable by {user!r}: mosquitto cannot save (it only logs)", fix)
    return _ok(what, f"{path} is writable by {user!r}")


def _check_key(path: Path, user: str) -> Finding:
    what = f"server key {path}"
    try:
        readable = _can(path, user, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    except OSError as e:
        return _missing(what, path, e, "`edge fleet ca issue-server --host HOST`")
    if readable is None:
        return _ok(what, f"present (no user {user!r} on this host: its rights not checked)")
    if not readable:
        return Finding(
            "ERROR",
            what,
            f"not readable by {user!r}, the user mosquitto drops to before it loads its key: the listener fails",
            f"`chgrp {user} {path} && chmod 0640 {path}` (edge fleet ca issue-server does it for group mosquitto)",
        )
    return _ok(what, f"readable by {user!r}")


def _gateway_ids(broker_dir: Path) -> tuple[str, ...]:
    try:
        text = _read(broker_dir / GATEWAYS_FILE).decode("utf-8", "replace")
    except OSError:
        return DEFAULT_GATEWAY_IDS
    return tuple(sorted({n.strip() for n in text.splitlines() if n.strip() and not n.lstrip().startswith("#")}))


def _expected_fragment(fleet_dir: Path, listener: BrokerListener, now: datetime.datetime) -> str | None:
    plugin = listener.dynsec_plugin or next((p for p in dynsec_plugin_candidates() if p.is_file()), None)
    return None if plugin is None else render_fragment(fleet_dir, listener, plugin, now=now)


def diagnose(
    fleet_dir: Path,
    *,
    now: datetime.datetime,
    broker_conf: Path | None = None,
    connect: bool = False,
    gateway: str | None = None,
    host: str | None = None,
    session_expiry: int = DEFAULT_SESSION_EXPIRY_S,
) -> list[Finding]:
    """Check a fleet directory and its broker (see the module docstring).

    Args:
        fleet_dir: the fleet directory.
        now: the current time (timezone-aware).
        broker_conf: the broker's mosquitto.conf (read with its includes); None: the fragment alone.
        connect: send a CONNECT as the gateway identity (takes over its session while it runs; see above).
        gateway: the gateway identity to probe with; None: the first with a certificate in ``gateway/``.
        host: the broker's address; None: the listener's bind address, else 127.0.0.1.
        session_expiry: the Session Expiry Interval a CONNECT asks for (the gateway's ``session_expiry_s``).

    Returns:
        The findings, in the order checked.
    """
    regenerate = f"edge fleet --dir {fleet_dir} broker-config"
    if not fleet_dir.is_dir():
        return [Finding("ERROR", "fleet directory", f"{fleet_dir} does not exist", "pass --dir, or `ca init`")]
    out: list[Finding] = []
    broker_dir = fleet_dir / BROKER_DIR
    try:
        listener = load_listener(broker_dir)
    except ConfigError as e:
        out.append(Finding("ERROR", "broker listener", str(e), f"{regenerate} --port PORT"))
        listener = BrokerListener()

    # The fragment: present, current, and the settings the guarantees need.
    fragment = broker_dir / FRAGMENT_FILE
    options: list[ConfOption] = []
    try:
        text = _read(fragment).decode("utf-8", "replace")
        options = parse_conf(text, str(fragment))
        expected = _expected_fragment(fleet_dir, listener, now)
        if expected is None:
            out.append(
                Finding(
                    "ERROR",
                    "broker dynamic-security plugin",
                    "mosquitto_dynamic_security.so not found",
                    f"install mosquitto 2, or {regenerate} --dynsec-plugin PATH",
                )
            )
        else:
            out.append(check_fragment(text, expected, path=str(fragment), regenerate=regenerate))
    except OSError as e:
        out.append(_missing("broker fragment", fragment, e, regenerate))
    whole = broker_conf is not None
    if broker_conf is not None:
        options, included, found = read_broker_conf(broker_conf)
        out += found
        if fragment.exists() and fragment.resolve() not in {p.resolve() for p in included}:
            out.append(
                Finding(
                    "ERROR",
                    "broker config",
                    f"{broker_conf} does not include {fragment}",
                    f"add `include_dir {broker_dir}` to {broker_conf} and restart the broker",
                )
            )
    if options:
        out += check_settings(options, whole_config=whole, regenerate=regenerate)
        location = next((o.value for o in reversed(options) if o.key == "persistence_location"), None)
        if location is not None:
            out.append(_check_location(location, _broker_user(options)))
    user = _broker_user(options)

    # Certificates, the CRL.
    ca_path = fleet_dir / CA_CERT_FILE
    ca: x509.Certificate | None = None
    try:
        ca_pem = _read(ca_path)
        out.append(check_certificate(f"CA {ca_path}", ca_pem, ca=None, now=now, fix="a new CA: `ca init --force`"))
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError:
            ca = None
    except OSError as e:
        out.append(_missing("CA", ca_path, e, f"edge fleet --dir {fleet_dir} ca init"))
    server_cert = listener.certfile or broker_dir / "server.pem"
    server_key = listener.keyfile or broker_dir / "server.key"
    issue_server = f"edge fleet --dir {fleet_dir} ca issue-server --host HOST"
    try:
        out.append(
            check_certificate(f"certificate {server_cert}", _read(server_cert), ca=ca, now=now, fix=issue_server)
        )
    except OSError as e:
        out.append(_missing(f"certificate {server_cert}", server_cert, e, issue_server))
    out.append(_check_key(server_key, user))
    crl_path = broker_dir / CRL_FILE
    try:
        out.append(check_crl(_read(crl_path), ca=ca, now=now, path=str(crl_path), fix=f"{regenerate}, then reload"))
    except OSError as e:
        out.append(_missing(f"CRL {crl_path}", crl_path, e, f"{regenerate}, then reload the broker"))
    probe_with: tuple[str, Path, Path] | None = None
    for name in _gateway_ids(broker_dir):
        cert, key = fleet_dir / GATEWAY_DIR / f"{name}.pem", fleet_dir / GATEWAY_DIR / f"{name}.key"
        issue = f"edge fleet --dir {fleet_dir} ca issue-client {name}"
        try:
            out.append(check_certificate(f"certificate {cert}", _read(cert), ca=ca, now=now, fix=issue))
        except OSError as e:
            out.append(
                _missing(f"certificate {cert}", cert, e, f"check it where gateway {name} runs, or {issue}", "WARN")
            )
            continue
        if key.is_file() and (probe_with is None or name == gateway):
            probe_with = (name, cert, key)

    # The TUF repository's timestamp.
    ts = fleet_dir / REPOSITORY_DIR / METADATA_DIR / "timestamp.json"
    if ts.parent.is_dir():
        refresh = f"edge fleet --dir {fleet_dir} models refresh (from a timer)"
        try:
            out.append(check_timestamp(_read(ts), now=now, path=str(ts), fix=refresh))
        except OSError as e:
            out.append(_missing(f"TUF timestamp {ts}", ts, e, refresh))
    else:
        out.append(_ok("TUF repository", f"{ts.parent.parent} not set up (no model updates)"))

    # The broker itself, as a gateway.
    forced = next((o.value for o in reversed(options) if o.key == "use_username_as_clientid"), "false") == "true"
    if gateway is not None and (probe_with is None or probe_with[0] != gateway):
        out.append(
            Finding(
                "ERROR",
                f"gateway session {gateway}",
                f"no certificate and key for gateway {gateway!r} in {fleet_dir / GATEWAY_DIR}",
                "name a gateway identity listed in broker/gateways whose files are here",
            )
        )
    elif probe_with is None:
        out.append(
            Finding(
                "WARN",
                "gateway session",
                f"no gateway certificate and key in {fleet_dir / GATEWAY_DIR}: the broker was not contacted",
                f"edge fleet --dir {fleet_dir} ca issue-client NAME",
            )
        )
    else:
        name, cert, key = probe_with
        address = host or listener.bind or "127.0.0.1"
        probe = probe_session(
            address,
            listener.port,
            gateway=name,
            ca=ca_path,
            cert=cert,
            key=key,
            connect=connect,
            forced_client_id=forced,
            session_expiry=session_expiry,
        )
        out.append(session_finding(probe, forced_client_id=forced))
    return out


def exit_code(findings: Iterable[Finding]) -> int:
    """1 when a finding is an ERROR, else 0."""
    return 1 if any(f.severity == "ERROR" for f in findings) else 0


def render(findings: Sequence[Finding], *, as_json: bool) -> str:
    """The findings as lines (``SEVERITY what: detail; fix: ...``) or as a JSON array."""
    if as_json:
        return json.dumps([f.as_dict() for f in findings], indent=2)
    return "\n".join(f.line() for f in findings)
