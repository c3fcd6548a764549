"""The work ledger as evidence: a signed, self-contained export of a device's verified envelopes, and its
re-verification.

An export is one JSON Lines file (UTF-8), version 2:

- line 1, the header: ``{"format": "edge-ledger-export", "version": 2, "device_id", "did", "enrolled_at",
  "day_from", "day_to", "rules": {"max_age_s", "max_ahead_s"}, "caps": {model id: {hour: cap}}, "ledger_key",
  "totals": {...}}`` (days ``YYYY-MM-DD`` or null for an open end; ``totals`` are the claims, the fields of
  ``LedgerTotals`` except ``device_id`` and ``did``; ``ledger_key`` the did:key of the gateway's ledger key);
- then one line per stored envelope in counter order: ``{"counter": c, "received_at": t, "envelope": base64}``,
  plus ``"credit": {outcome: [idx, ...], "copied": [[idx, first claimant], ...]}`` when an inference record of the
  envelope was not credited (``edge.fleet.credit``); the envelope is the exact bytes the gateway received;
- last, ``{"signature": base64}``: the gateway's ledger key's Ed25519 signature over
  ``b"edge-ledger-export/2\\x00" + SHA-256(every byte before this line)``.

Only accepted envelopes are ever stored, so an export holds only those. ``verify_export`` needs the file and the
gateway's ledger public key (``ledger.pub`` of the fleet directory, handed to the verifier out of band). It refuses
a file the key did not sign, then checks every envelope as the gateway did: its signature over the raw bytes against
the did:key, its kid (the header's device) and counter (the line's), counters growing, consecutive counters linking.
Counters absent between two present ones are gaps: reported in the totals, not an error. Then it recomputes the
credit of every inference with the gateway's rules:

- ``implausible_time`` exactly for the records the rules judge so (the record's timestamp, the line's
  ``received_at``, the header's ``enrolled_at`` and ``rules``);
- of one (model, input) within the export, at most one record is new work (credited or over the ceiling), the others
  ``duplicate_input``; if one is ``copied``, all are, from the same other device;
- credited records per (model, UTC hour) stay within the header's cap of that hour;
- the recomputed totals equal the header's.

What the file alone cannot show (that another device claimed an input first, that this device claimed it before the
export's first day, that an hour's cap was used by envelopes outside the export) is the gateway's word, covered by
its signature. ``received_at`` is the gateway's word too; it is checked against the header's day range.

A verifier must still decide whether the did:key is the device's (e.g. from the fleet's registry or certificate):
the file proves what that key signed, not whose key it is. ``LedgerTotals`` carries ``device_id`` and ``did``.

Parsing is strict: every line bounded in length, JSON without duplicate keys, NaN or infinities, every field of the
expected type (booleans are not numbers), nothing unknown.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edge._fs import atomic_write
from edge.errors import InputError
from edge.fleet._json import strict_loads
from edge.fleet.credit import HOUR_S, UNCREDITED, CreditRules, Outcome
from edge.fleet.errors import LedgerExportError, StoreError, UnknownDeviceError
from edge.fleet.store import Store
from edge.fleet.store._batch import ChainRow
from edge.fleet.store._checks import utc_day
from edge.identity.did import did_key_from_public, public_from_did_key
from edge.identity.errors import InvalidDidError, KeyFileError
from edge.identity.keys import load_private_key, load_public_key, validate_device_id
from edge.wire._bounds import MAX_COUNTER, MAX_EPOCH
from edge.wire.envelope import Envelope, open_envelope
from edge.wire.records import InferenceRecord, ReadingRecord
from edge.wire.schema import DEFAULT_LIMITS, EventRecord, LossNotice, TelemetryLimits

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "LEDGER_KEY_FILE",
    "LEDGER_PUBLIC_FILE",
    "LedgerTotals",
    "export_ledger",
    "ledger_key",
    "verify_export",
]

EXPORT_FORMAT: Final = "edge-ledger-export"
EXPORT_VERSION: Final = 2
LEDGER_KEY_FILE: Final = "ledger.key"
LEDGER_PUBLIC_FILE: Final = "ledger.pub"
_SIGNATURE_CONTEXT: Final = b"edge-ledger-export/2\x00"
_HEADER_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "device_id",
        "did",
        "enrolled_at",
        "day_from",
        "day_to",
        "rules",
        "caps",
        "ledger_key",
        "totals",
    }
)
_LINE_KEYS: Final = frozenset({"counter", "received_at", "envelope"})
_CREDIT_KEYS: Final = frozenset(o.value for o in UNCREDITED)
_MAX_CAP: Final = MAX_COUNTER  # a per-hour ceiling, held exactly by every JSON reader like a counter
_MAX_JSON_DEPTH: Final = 5  # header: totals / credits / model / outcome


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """What an export holds, recomputed from the envelopes.

    Attributes:
        device_id: the device.
        did: its did:key (the key every envelope verified under).
        envelopes: envelopes in the export.
        records: records in them (every type).
        inferences: inference records (claimed work) by model id.
        credits: by model id, the count of each credit outcome (``edge.fleet.credit.Outcome``; absent: zero).
        readings: reading records.
        events: event records.
        announced_lost: dropped counters the device's loss notices announced, each once.
        announced_lost_records: the records they held, by the device's word.
        first_counter: the lowest counter, None for an empty export.
        last_counter: the highest counter, None for an empty export.
        gaps: counters absent between ``first_counter`` and ``last_counter``.
    """

    device_id: str
    did: str
    envelopes: int
    records: int
    inferences: dict[str, int]
    credits: dict[str, dict[str, int]]
    readings: int
    events: int
    announced_lost: int
    announced_lost_records: int
    first_counter: int | None
    last_counter: int | None
    gaps: int

    @property
    def credited(self) -> int:
        """Credited inferences (the work the device is paid for)."""
        return sum(by.get(Outcome.CREDITED.value, 0) for by in self.credits.values())

    def claims(self) -> dict[str, Any]:
        """The totals as the header states them (every field but ``device_id`` and ``did``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("device_id", "did")}


class _Chain:
    """Totals and chain checks over envelopes fed in counter order; raises ``ValueError`` naming the problem."""

    def __init__(self) -> None:
        self.envelopes = self.records = self.readings = self.events = self.gaps = 0
        self.inferences: Counter[str] = Counter()
        self.losses = ChainRow(None, 0, None)  # its lost_mark counts each announced counter once, as the store does
        self.lost = self.lost_records = 0
        self.first: int | None = None
        self.last: Envelope | None = None

    def feed(self, env: Envelope) -> None:
        last = self.last
        if last is not None:
            if env.counter <= last.counter:
                raise ValueError(f"counter {env.counter} does not follow {last.counter} (counters must grow)")
            if env.counter == last.counter + 1 and env.prev != last.hash:
                raise ValueError(f"counter {env.counter} does not link to counter {last.counter} (prev differs)")
            self.gaps += env.counter - last.counter - 1
        else:
            self.first = env.counter
        self.last = env
        self.envelopes += 1
        self.records += len(env.records)
        for r in env.records:
            if isinstance(r, InferenceRecord):
                self.inferences[r.model_id] += 1
            elif isinstance(r, ReadingRecord):
                self.readings += 1
            elif isinstance(r, EventRecord):
                self.events += 1
            elif isinstance(r, LossNotice):
                envelopes, dropped = self.losses.announce(r)
                self.lost += envelopes
                self.lost_records += dropped

    def totals(self, device_id: str, did: str, credits: dict[str, dict[str, int]]) -> LedgerTotals:
        return LedgerTotals(
            device_id=device_id,
            did=did,
            envelopes=self.envelopes,
            records=self.records,
            inferences=dict(sorted(self.inferences.items())),
            credits=credits,
            readings=self.readings,
            events=self.events,
            announced_lost=self.lost,
            announced_lost_records=self.lost_records,
            first_counter=self.first,
            last_counter=None if self.last is None else self.last.counter,
            gaps=self.gaps,
        )


def ledger_key(fleet_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The fleet's ledger key (``ledger.key``, 0600, beside ``ledger.pub``), made on first use.

    It signs exports only; a verifier gets ``ledger.pub``. Kept apart from the CA and command keys: an export must
    not be something a leaked command key can forge, nor the reverse.

    Raises:
        ConfigError: the key file exists but cannot be read, has loose permissions, or disagrees with ledger.pub.
    """
    root = Path(fleet_dir)
    path, pub_path = root / LEDGER_KEY_FILE, root / LEDGER_PUBLIC_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        atomic_write(pub_path, key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        atomic_write(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600)
        return key
    key = load_private_key(path)
    raw = (Encoding.Raw, PublicFormat.Raw)
    if load_public_key(pub_path).public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise KeyFileError(pub_path, f"the public key of {LEDGER_KEY_FILE}")
    return key


def export_ledger(
    store: Store,
    device_id: str,
    path: str | os.PathLike[str],
    *,
    key: Ed25519PrivateKey,
    rules: CreditRules | None = None,
    day_from: str | None = None,
    day_to: str | None = None,
    limits: TelemetryLimits = DEFAULT_LIMITS,
) -> LedgerTotals:
    """Write a signed, self-contained, re-verifiable export of a device's stored envelopes (atomically).

    The envelopes are verified as they are read and their credit is checked as ``verify_export`` will (an export
    never vouches for bytes that do not verify). The file is built in memory before the atomic write: about 1.4
    times the envelopes' bytes.

    Args:
        store: the gateway store.
        device_id: the device (revoked ones too: their past work stays provable).
        path: the file to write (replaced atomically).
        key: the gateway's ledger key (``ledger_key``).
        rules: the crediting rules the gateway ran with; None: the defaults.
        day_from: first UTC receipt day included (``YYYY-MM-DD``), None for no bound.
        day_to: last UTC receipt day included, None for no bound.
        limits: the limits the envelopes were accepted under.

    Returns:
        The totals written to the header.

    Raises:
        UnknownDeviceError: no such device.
        GatewayInputError: a day is not ``YYYY-MM-DD``.
        StoreError: the database failed, or a stored envelope does not verify, link or credit as stored (the store
            is corrupt).
        OSError: the file cannot be written.
    """
    rules = rules or CreditRules()
    device = store.device(device_id)
    if device is None:
        raise UnknownDeviceError(f"no device {device_id!r} is registered")
    try:
        device_key = public_from_did_key(device.did)
    except InvalidDidError as e:
        raise StoreError(f"device {device_id!r}: the stored did is invalid: {e}") from e
    if device_key.public_bytes(Encoding.Raw, PublicFormat.Raw) != device.public_key:
        raise StoreError(f"device {device_id!r}: the stored did and public key disagree")
    chain = _Chain()
    credit = _Credit(rules, device.enrolled_at, device_id)
    body = io.BytesIO()
    for stored in store.envelopes(device_id, day_from=day_from, day_to=day_to):
        line: dict[str, Any] = {
            "counter": stored.counter,
            "received_at": stored.received_at,
            "envelope": base64.b64encode(stored.data).decode("ascii"),
        }
        try:
            env = open_envelope(stored.data, device_key, limits)
            if env.device_id != device_id or env.counter != stored.counter:
                raise ValueError(f"holds device {env.device_id!r} counter {env.counter}")
            chain.feed(env)
            if stored.credit is not None:
                line["credit"] = strict_loads(stored.credit, _MAX_JSON_DEPTH)
            credit.feed(env, stored.received_at, line.get("credit"))
        except (InputError, ValueError) as e:
            raise StoreError(f"stored envelope {stored.counter} of {device_id!r} does not verify: {e}") from e
        body.write(_dumps(line) + b"\n")
    stored_caps = store.credit_caps(device_id)
    caps: dict[str, dict[int, int]] = {}
    for model, hour in sorted(credit.hours):  # the caps of the hours this export credits, and no others
        if (model, hour) in stored_caps:
            caps.setdefault(model, {})[hour] = stored_caps[model, hour]
    try:
        credits = credit.totals(caps)
    except ValueError as e:
        raise StoreError(f"the stored credit of {device_id!r} does not recompute: {e}") from e
    totals = chain.totals(device_id, device.did, credits)
    header = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "device_id": device_id,
        "did": device.did,
        "enrolled_at": device.enrolled_at,
        "day_from": day_from,
        "day_to": day_to,
        "rules": {"max_age_s": rules.max_age_s, "max_ahead_s": rules.max_ahead_s},
        "caps": {m: {str(h): c for h, c in hours.items()} for m, hours in caps.items()},
        "ledger_key": did_key_from_public(key.public_key()),
        "totals": totals.claims(),
    }
    content = _dumps(header) + b"\n" + body.getvalue()
    signature = key.sign(_SIGNATURE_CONTEXT + hashlib.sha256(content).digest())
    atomic_write(path, content + _dumps({"signature": base64.b64encode(signature).decode("ascii")}) + b"\n")
    return totals


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


# -- verification ---------------------------------------------------------------------------------------------------


def _fail(line: int, problem: str) -> LedgerExportError:
    return LedgerExportError(f"line {line}: {problem}")


def _json_line(raw: bytes, n: int, max_len: int) -> dict[str, Any]:
    if len(raw) > max_len:
        raise _fail(n, f"longer than {max_len} bytes")
    if not raw.endswith(b"\n"):
        raise _fail(n, "truncated (no end of line)")
    try:
        obj = strict_loads(raw, _MAX_JSON_DEPTH)
    except ValueError as e:
        raise _fail(n, f"not strict JSON: {e}") from e
    if not isinstance(obj, dict):
        raise _fail(n, "not a JSON object")
    return obj


def _is_int(value: object, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _is_time(value: object) -> bool:
    return type(value) in (int, float) and 0 <= value <= MAX_EPOCH  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class _Header:
    device_id: str
    did: str
    key: Ed25519PublicKey
    enrolled_at: float
    day_from: str | None
    day_to: str | None
    rules: CreditRules
    caps: dict[str, dict[int, int]]
    ledger_key: str
    totals: dict[str, Any]


def _header(obj: dict[str, Any]) -> _Header:
    if set(obj) != _HEADER_KEYS or obj["format"] != EXPORT_FORMAT:
        raise _fail(1, f"not an {EXPORT_FORMAT} header (expected keys {sorted(_HEADER_KEYS)})")
    if not _is_int(obj["version"], EXPORT_VERSION, EXPORT_VERSION):
        raise _fail(1, f"version {obj['version']!r:.20}, this verifier reads {EXPORT_VERSION}")
    try:
        device_id = validate_device_id(obj["device_id"])
        key = public_from_did_key(obj["did"])
        public_from_did_key(obj["ledger_key"])
    except InputError as e:  # InvalidDeviceIdError, InvalidDidError
        raise _fail(1, str(e)) from e
    if not _is_time(obj["enrolled_at"]):
        raise _fail(1, f"enrolled_at {obj['enrolled_at']!r:.20} is not epoch seconds")
    days = []
    for name in ("day_from", "day_to"):
        day = obj[name]
        if day is not None and (not isinstance(day, str) or len(day) != 10 or not _is_day(day)):
            raise _fail(1, f"{name} {day!r:.20} is not YYYY-MM-DD or null")
        days.append(day)
    rules = obj["rules"]
    if not isinstance(rules, dict) or set(rules) != {"max_age_s", "max_ahead_s"}:
        raise _fail(1, "rules must hold exactly max_age_s and max_ahead_s")
    try:
        if not all(type(v) in (int, float) for v in rules.values()):
            raise ValueError("not numbers")
        parsed_rules = CreditRules(max_age_s=float(rules["max_age_s"]), max_ahead_s=float(rules["max_ahead_s"]))
    except ValueError as e:
        raise _fail(1, f"rules: {e}") from e
    caps = obj["caps"]
    if not isinstance(caps, dict):
        raise _fail(1, "caps is not an object")
    parsed_caps: dict[str, dict[int, int]] = {}
    for model, hours in caps.items():
        if not isinstance(hours, dict):
            raise _fail(1, f"caps of {model!r:.40} is not an object")
        try:
            parsed_caps[model] = {int(h): c for h, c in hours.items() if _is_int(c, 1, _MAX_CAP) and h.isdigit()}
        except ValueError as e:
            raise _fail(1, f"caps of {model!r:.40}: {e}") from e
        if len(parsed_caps[model]) != len(hours):
            raise _fail(1, f"caps of {model!r:.40}: expected hour numbers mapped to positive integers")
    if not isinstance(obj["totals"], dict):
        raise _fail(1, "totals is not an object")
    return _Header(
        device_id, obj["did"], key, float(obj["enrolled_at"]), days[0], days[1], parsed_rules, parsed_caps,
        obj["ledger_key"], obj["totals"],
    )  # fmt: skip


def _is_day(day: str) -> bool:
    try:
        return datetime.date.fromisoformat(day).isoformat() == day
    except ValueError:
        return False


def _envelope_line(obj: dict[str, Any], n: int, h: _Header) -> tuple[int, float, bytes, Any]:
    if not _LINE_KEYS <= set(obj) <= _LINE_KEYS | {"credit"}:
        raise _fail(n, f"expected exactly the keys {sorted(_LINE_KEYS)} and an optional credit")
    counter, received_at, encoded = obj["counter"], obj["received_at"], obj["envelope"]
    if not _is_int(counter, 1, MAX_COUNTER):
        raise _fail(n, f"counter {counter!r:.20} is not an integer in 1..2**53")
    if not _is_time(received_at):
        raise _fail(n, f"received_at {received_at!r:.20} is not epoch seconds")
    day = utc_day(received_at)
    if (h.day_from is not None and day < h.day_from) or (h.day_to is not None and day > h.day_to):
        raise _fail(n, f"received on {day}, outside the export's range {h.day_from}..{h.day_to}")
    if not isinstance(encoded, str):
        raise _fail(n, "envelope is not a base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(n, f"envelope is not valid base64: {e}") from e
    return counter, float(received_at), data, obj.get("credit")


class _Credit:
    """Recomputes the credit of one device's inferences from an export's lines (see the module docstring)."""

    def __init__(self, rules: CreditRules, enrolled_at: float, device_id: str) -> None:
        self.rules = rules
        self.enrolled_at = enrolled_at
        self.device_id = device_id
        self.tally: Counter[tuple[str, str]] = Counter()
        self.keys: dict[tuple[str, str], list[tuple[str, str | None]]] = {}
        self.hours: Counter[tuple[str, int]] = Counter()

    def feed(self, env: Envelope, received_at: float, credit: Any) -> None:
        """Check one envelope's stated credit against the rules; raises ``ValueError`` naming the problem."""
        inferences = {i: r for i, r in enumerate(env.records) if isinstance(r, InferenceRecord)}
        stated: dict[int, tuple[str, str | None]] = {}
        if credit is not None:
            if not isinstance(credit, dict) or not credit or not set(credit) <= _CREDIT_KEYS:
                raise ValueError(f"credit must map some of {sorted(_CREDIT_KEYS)} to record indices")
            for outcome, entries in credit.items():
                if not isinstance(entries, list) or not entries:
                    raise ValueError(f"credit {outcome!r}: expected a non-empty list")
                for entry in entries:
                    idx, other = _credit_entry(outcome, entry)
                    if idx not in inferences or idx in stated:
                        raise ValueError(f"credit {outcome!r}: record {idx} is not an inference or listed twice")
                    stated[idx] = (outcome, other)
        for idx, r in inferences.items():
            outcome, other = stated.get(idx, (Outcome.CREDITED.value, None))
            plausible = self.rules.plausible(r.timestamp, received_at, self.enrolled_at)
            if plausible == (outcome == Outcome.IMPLAUSIBLE_TIME.value):
                raise ValueError(f"record {idx} is stated {outcome} but the rules judge its time plausible={plausible}")
            if plausible:
                self.keys.setdefault((r.model_id, r.input_sha256), []).append((outcome, other))
            if outcome == Outcome.CREDITED.value:
                self.hours[r.model_id, int(r.timestamp // HOUR_S)] += 1
            self.tally[r.model_id, outcome] += 1

    def totals(self, caps: Mapping[str, Mapping[int, int]]) -> dict[str, dict[str, int]]:
        """Check the stated outcomes as a whole and return them per model; raises ``ValueError``."""
        for (model, input_hex), occurrences in self.keys.items():
            outcomes = [o for o, _other in occurrences]
            if Outcome.COPIED.value in outcomes:
                others = {other for o, other in occurrences}
                if set(outcomes) != {Outcome.COPIED.value} or len(others) != 1 or self.device_id in others:
                    raise ValueError(f"input {input_hex[:16]}... of {model}: copied from one other device, or not")
            elif sum(o in (Outcome.CREDITED.value, Outcome.OVER_CEILING.value) for o in outcomes) > 1:
                raise ValueError(f"input {input_hex[:16]}... of {model} is credited as new work more than once")
        for (model, hour), n in sorted(self.hours.items()):
            cap = caps.get(model, {}).get(hour)
            if cap is None or n > cap:
                raise ValueError(f"{n} inferences of {model} credited in hour {hour}, cap {cap}")
        out: dict[str, dict[str, int]] = {}
        for (model, outcome), n in sorted(self.tally.items()):
            out.setdefault(model, {})[outcome] = n
        return out


def _credit_entry(outcome: str, entry: object) -> tuple[int, str | None]:
    if outcome == Outcome.COPIED.value:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not _is_int(entry[0], 0, 1 << 16)
            or not isinstance(entry[1], str)
        ):
            raise ValueError("copied entries are [record index, first claimant]")
        validate_device_id(entry[1])
        return entry[0], entry[1]
    if not _is_int(entry, 0, 1 << 16):
        raise ValueError(f"credit {outcome!r}: expected record indices")
    return entry, None  # type: ignore[return-value]


def verify_export(
    path: str | os.PathLike[str], *, ledger_key: Ed25519PublicKey, limits: TelemetryLimits = DEFAULT_LIMITS
) -> LedgerTotals:
    """Re-verify an export with the file and the gateway's ledger public key (what a third party runs).

    Args:
        path: the export.
        ledger_key: the gateway's ledger public key (``ledger.pub``), obtained out of band.
        limits: the limits envelopes are decoded under (the gateway's; the defaults unless it changed them).

    Returns:
        The recomputed totals, equal to the header's claims. The caller still decides whether ``did`` is the
        device's key.

    Raises:
        LedgerExportError: not signed by ``ledger_key``, or the first line that fails (malformed, a signature that
            does not verify, another device's envelope, counters out of order, a broken link, a credit the rules
            refute), or the first total that disagrees.
        OSError: the file cannot be read.
    """
    # A line holds one base64 envelope plus a little JSON; anything longer is not ours and is not buffered whole.
    max_len = (limits.max_envelope_bytes + 2) // 3 * 4 + 64 * 1024
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        first = f.readline(max_len + 1)
        digest.update(first)
        h = _header(_json_line(first, 1, max_len))
        if h.ledger_key != did_key_from_public(ledger_key):
            raise LedgerExportError("header: signed by another ledger key than the one given")
        chain = _Chain()
        credit = _Credit(h.rules, h.enrolled_at, h.device_id)
        n, signature = 1, None
        while raw := f.readline(max_len + 1):
            n += 1
            obj = _json_line(raw, n, max_len)
            if signature is not None:
                raise _fail(n, "a line after the signature")
            if set(obj) == {"signature"}:
                signature = _signature(obj, n)
                continue
            digest.update(raw)
            _verify_line(obj, n, h, chain, credit, limits)
    if signature is None:
        raise LedgerExportError("no signature line: the file is truncated or was not written by a gateway")
    try:
        ledger_key.verify(signature, _SIGNATURE_CONTEXT + digest.digest())
    except InvalidSignature as e:
        raise LedgerExportError("the ledger signature does not verify: the file was changed or not signed") from e
    try:
        credits = credit.totals(h.caps)
    except ValueError as e:
        raise LedgerExportError(f"credit: {e}") from e
    totals = chain.totals(h.device_id, h.did, credits)
    _compare(totals.claims(), h.totals)
    return totals


def _signature(obj: dict[str, Any], n: int) -> bytes:
    value = obj["signature"]
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        sig = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(n, f"signature is not base64: {e}") from e
    if len(sig) != 64:
        raise _fail(n, "signature is not 64 bytes")
    return sig


def _verify_line(  # noqa: PLR0917 -- the verifier's running state
    obj: dict[str, Any], n: int, h: _Header, chain: _Chain, credit: _Credit, limits: TelemetryLimits
) -> None:
    counter, received_at, data, stated = _envelope_line(obj, n, h)
    try:
        env = open_envelope(data, h.key, limits)
    except InputError as e:
        raise _fail(n, f"envelope does not verify: {e}") from e
    if env.device_id != h.device_id:
        raise _fail(n, f"envelope of device {env.device_id!r}, the export is of {h.device_id!r}")
    if env.counter != counter:
        raise _fail(n, f"line says counter {counter}, the signed envelope says {env.counter}")
    _checked(n, lambda: chain.feed(env))
    _checked(n, lambda: credit.feed(env, received_at, stated))


def _checked(n: int, fn: Callable[[], None]) -> None:
    try:
        fn()
    except ValueError as e:
        raise _fail(n, str(e)) from e


def _compare(actual: dict[str, Any], claims: dict[str, Any]) -> None:
    for name, value in actual.items():
        if name not in claims:
            raise LedgerExportError(f"header: total {name!r} is missing")
        # Compared as canonical JSON: true is not 1, 1.0 is not 1, at any depth.
        if json.dumps(claims[name], sort_keys=True) != json.dumps(value, sort_keys=True):
            raise LedgerExportError(f"total {name!r}: the header claims {claims[name]!r}, the envelopes give {value!r}")
    extra = set(claims) - set(actual)
    if extra:
        raise LedgerExportError(f"header: unknown totals {sorted(extra)}")
