"""The mosquitto configuration, sans-IO: parse it (``parse_conf``), check the settings the delivery guarantees depend
on as mosquitto applies them (``check_settings``: the last occurrence of a global option wins, a second
``persistence_location`` stops it at start), and compare the generated fragment with what ``broker-config`` writes now
(``check_fragment``). Every function takes text and returns values; reading the files is the package's job.

What "lossless" needs from mosquitto (``edge.fleet.pki.registry.render_fragment`` writes it; docs/gateway.md):
persistence on with a directory the broker's user can write, saves every few seconds, queues large enough for a
gateway outage, a packet limit that admits every legal envelope, sessions kept long enough, retained messages (the
receipts). A box resends whatever has no receipt, so a broker that drops costs a resend, never data; these settings
make drops rare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from edge.fleet.doctor._findings import Finding
from edge.fleet.doctor._findings import ok as _ok
from edge.fleet.pki.registry import (
    AUTOSAVE_INTERVAL_S,
    MAX_INFLIGHT_MESSAGES,
    MAX_PACKET_BYTES,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
)
from edge.wire.schema import DEFAULT_LIMITS

__all__ = ["ConfOption", "check_fragment", "check_settings", "parse_conf"]

# The shortest offline time a persistent session must survive: a gateway down over a weekend night, a box offline.
MIN_CLIENT_EXPIRATION_S: Final = 86400
MAX_AUTOSAVE_S: Final = 60  # beyond this a broker crash costs minutes of resends (mosquitto's default: 1800 s)
MIN_INFLIGHT: Final = 500  # a box's publish window (edge.telemetry.publisher)
# Options mosquitto reads as strings and refuses to see twice ("Duplicate persistence_location value").
_UNIQUE_OPTIONS: Final = frozenset({"persistence_location", "persistence_file", "pid_file"})
_DURATION_UNITS: Final = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


@dataclass(frozen=True, slots=True)
class ConfOption:
    """One option line of a mosquitto configuration file."""

    key: str
    value: str
    source: str  # "path:line"


def parse_conf(text: str, source: str) -> list[ConfOption]:
    """The options of one mosquitto configuration file, in order (comments and blank lines skipped).

    Args:
        text: the file's text.
        source: its path, for the findings.

    Returns:
        One ``ConfOption`` per option line.
    """
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.append(ConfOption(key, value.strip(), f"{source}:{n}"))
    return out


def _duration_s(text: str) -> int | None:
    """mosquitto's ``persistent_client_expiration`` (``14d``, ``1y``) in seconds; None if malformed."""
    if len(text) < 2 or text[-1] not in _DURATION_UNITS or not text[:-1].isdigit():
        return None
    return int(text[:-1]) * _DURATION_UNITS[text[-1]]


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def check_settings(options: Sequence[ConfOption], *, whole_config: bool, regenerate: str) -> list[Finding]:
    """Check the broker settings the delivery guarantees depend on, as mosquitto would apply them (the last
    occurrence of a global option wins; a second ``persistence_location`` stops it at start).

    Args:
        options: every option mosquitto reads, in its order (the whole configuration, or the fragment alone).
        whole_config: ``options`` is the whole configuration (else the fragment alone: what mosquitto.conf adds is
            unknown, so a persistence location not in the fragment is not an error).
        regenerate: the command that rewrites the fragment (named in the fixes).

    Returns:
        One finding per setting.
    """
    last: dict[str, ConfOption] = {}
    seen: dict[str, list[ConfOption]] = {}
    for o in options:
        last[o.key] = o
        seen.setdefault(o.key, []).append(o)
    out: list[Finding] = []
    restart = f"{regenerate}, then restart the broker"

    def value(key: str, default: str) -> tuple[str, str]:
        o = last.get(key)
        return (o.value, o.source) if o is not None else (default, "mosquitto's default")

    for key in sorted(_UNIQUE_OPTIONS):
        if len(seen.get(key, [])) > 1:
            where = ", ".join(o.source for o in seen[key])
            out.append(
                Finding(
                    "ERROR",
                    f"broker {key}",
                    f"set {len(seen[key])} times ({where}): mosquitto refuses to start (Duplicate {key} value)",
                    f"keep one: remove it from mosquitto.conf, or `{regenerate} --persistence-location ''`"
                    if key == "persistence_location"
                    else "keep one",
                )
            )

    v, src = value("persistence", "false")
    if v != "true":
        out.append(
            Finding(
                "ERROR",
                "broker persistence",
                f"{v} ({src}): a broker restart loses every queued message and session (the boxes resend)",
                restart,
            )
        )
    else:
        out.append(_ok("broker persistence", f"true ({src})"))
        loc = last.get("persistence_location")
        if loc is not None:
            out.append(_ok("broker persistence_location", f"{loc.value} ({loc.source})"))
        elif whole_config:
            out.append(
                Finding(
                    "ERROR",
                    "broker persistence_location",
                    "not set: mosquitto saves into its working directory (under systemd: /, which its user cannot "
                    "write), so nothing survives a restart",
                    f"add `persistence_location /var/lib/mosquitto/` to mosquitto.conf, or "
                    f"`{regenerate} --persistence-location DIR`",
                )
            )
        else:
            out.append(
                _ok(
                    "broker persistence_location",
                    "left to mosquitto.conf (Debian's default sets /var/lib/mosquitto/; "
                    "pass --broker-conf to check it)",
                )
            )

    v, src = value("autosave_interval", "1800")
    on_changes, _ = value("autosave_on_changes", "false")
    n = _int(v)
    if on_changes == "true":
        out.append(
            Finding(
                "WARN",
                "broker autosave_on_changes",
                f"true: autosave_interval ({v}) counts changes, so an idle broker may not save for a long time",
                restart,
            )
        )
    elif n is None or n <= 0 or n > MAX_AUTOSAVE_S:
        out.append(
            Finding(
                "ERROR",
                "broker autosave_interval",
                f"{v} ({src}): a SIGKILL or power loss loses "
                + ("everything since the start" if n == 0 else f"up to {v} s")
                + " of queued messages (the boxes resend them after telemetry.receipt_timeout_s)",
                f"{restart} (autosave_interval {AUTOSAVE_INTERVAL_S})",
            )
        )
    else:
        out.append(_ok("broker autosave_interval", f"{v} s ({src})"))

    v, src = value("max_queued_messages", "1000")
    n = _int(v)
    if n == 0:
        out.append(
            Finding(
                "WARN",
                "broker max_queued_messages",
                f"0 ({src}): unlimited in mosquitto 2.0.11, but some 2.0.x versions read 0 as a quota of nothing",
                f"{restart} (max_queued_messages {MAX_QUEUED_MESSAGES})",
            )
        )
    elif n is None or n < MAX_QUEUED_MESSAGES:
        out.append(
            Finding(
                "ERROR",
                "broker max_queued_messages",
                f"{v} ({src}): once a gateway falls that far behind (a restart, an outage, one box flooding its "
                "topic) the broker drops what it already acknowledged to the boxes",
                f"{restart} (max_queued_messages {MAX_QUEUED_MESSAGES})",
            )
        )
    else:
        out.append(_ok("broker max_queued_messages", f"{v} ({src})"))

    v, src = value("max_queued_bytes", "0")
    n = _int(v)
    if n == 0:
        out.append(
            Finding(
                "WARN",
                "broker max_queued_bytes",
                f"0 ({src}): no byte bound, so a flood of large envelopes can exhaust the broker's memory",
                f"{restart} (max_queued_bytes {MAX_QUEUED_BYTES})",
            )
        )
    elif n is None or n < MAX_QUEUED_BYTES:
        out.append(
            Finding(
                "WARN",
                "broker max_queued_bytes",
                f"{v} ({src}): a gateway outage fills it sooner than {MAX_QUEUED_BYTES} bytes, then the broker drops "
                "(the boxes resend)",
                f"{restart} (max_queued_bytes {MAX_QUEUED_BYTES})",
            )
        )
    else:
        out.append(_ok("broker max_queued_bytes", f"{v} ({src})"))

    v, src = value("max_inflight_messages", "20")
    n = _int(v)
    if n is None or 0 < n < MIN_INFLIGHT:
        out.append(
            Finding(
                "WARN",
                "broker max_inflight_messages",
                f"{v} ({src}): below a box's publish window ({MIN_INFLIGHT}), so every box is throttled",
                f"{restart} (max_inflight_messages {MAX_INFLIGHT_MESSAGES})",
            )
        )
    else:
        out.append(_ok("broker max_inflight_messages", f"{v} ({src})"))

    v, src = value("max_packet_size", "0")
    n = _int(v)
    if n == 0:
        out.append(
            Finding(
                "WARN",
                "broker max_packet_size",
                f"0 ({src}): no limit, so a hostile box can make the broker buffer huge messages",
                f"{restart} (max_packet_size {MAX_PACKET_BYTES})",
            )
        )
    elif n is None or n < MAX_PACKET_BYTES:
        out.append(
            Finding(
                "ERROR",
                "broker max_packet_size",
                f"{v} ({src}): smaller than the largest envelope plus its headers ({MAX_PACKET_BYTES}): such "
                "envelopes are refused and their box disconnected, for ever",
                f"{restart} (max_packet_size {MAX_PACKET_BYTES})",
            )
        )
    else:
        out.append(_ok("broker max_packet_size", f"{v} ({src})"))

    v, src = value("message_size_limit", "0")
    n = _int(v)
    if n is None or 0 < n < DEFAULT_LIMITS.max_envelope_bytes:
        out.append(
            Finding(
                "ERROR",
                "broker message_size_limit",
                f"{v} ({src}): smaller than the largest envelope ({DEFAULT_LIMITS.max_envelope_bytes} bytes): the "
                "broker answers such an envelope with an error and its box retries it for ever",
                f"remove message_size_limit ({src}); max_packet_size bounds messages",
            )
        )

    v, src = value("persistent_client_expiration", "")
    if not v:
        out.append(
            Finding(
                "WARN",
                "broker persistent_client_expiration",
                "not set: a session asking to be kept for ever is never removed, with its queue",
                f"{restart} (persistent_client_expiration 30d)",
            )
        )
    else:
        secs = _duration_s(v)
        if secs is None or secs < MIN_CLIENT_EXPIRATION_S:
            out.append(
                Finding(
                    "ERROR",
                    "broker persistent_client_expiration",
                    f"{v} ({src}): an offline gateway's or box's session (and its queue) is removed within a day",
                    f"{restart} (persistent_client_expiration 30d)",
                )
            )
        else:
            out.append(_ok("broker persistent_client_expiration", f"{v} ({src})"))

    v, src = value("retain_available", "true")
    if v != "true":
        out.append(
            Finding(
                "ERROR",
                "broker retain_available",
                f"{v} ({src}): the gateway's retained receipts are refused, so boxes resend everything",
                restart,
            )
        )
    else:
        out.append(_ok("broker retain_available", f"{v} ({src})"))
    return out


def _significant(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_fragment(actual: str, expected: str, *, path: str, regenerate: str) -> Finding:
    """Whether the fragment on disk is what ``broker-config`` writes now (comments, and so the time stamp, aside).

    Args:
        actual: the fragment's text.
        expected: ``render_fragment`` for the recorded settings.
        path: the fragment's path.
        regenerate: the command that rewrites it.
    """
    got, want = _significant(actual), _significant(expected)
    if got == want:
        return _ok("broker fragment", f"{path} is current")
    for i in range(max(len(got), len(want))):
        g = got[i] if i < len(got) else "(nothing)"
        w = want[i] if i < len(want) else "(nothing)"
        if g != w:
            break
    return Finding(
        "WARN",
        "broker fragment",
        f"{path} differs from what broker-config writes now (has {g!r} where {w!r} is due)",
        f"{regenerate}, then restart the broker",
    )
