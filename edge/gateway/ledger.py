"""The work ledger as evidence: a self-contained export of a device's verified envelopes, and its re-verification.

An export is one JSON Lines file (UTF-8):

- line 1, the header: ``{"format": "edge-ledger-export", "version": 1, "device_id": ..., "did": ...,
  "day_from": ..., "day_to": ..., "totals": {...}}`` (days ``YYYY-MM-DD`` or null for an open end; ``totals``
  are the claims, the fields of ``LedgerTotals`` except ``device_id`` and ``did``);
- then one line per stored envelope in counter order: ``{"counter": c, "received_at": t, "envelope": base64}``,
  the envelope being the exact bytes the gateway received and stored.

``verify_export`` needs nothing but the file: the did:key names the Ed25519 key, every envelope's signature is
checked over its raw bytes, its kid must be the header's device and its counter the line's, counters must grow,
and consecutive counters must link (the envelope at c + 1 names the hash of the one at c as ``prev``). Counters
that are absent between two present ones are gaps: reported in the totals, not an error (an outbox may drop and
announce them). The recomputed totals must equal the claimed ones. ``received_at`` is the gateway's word (it
cannot be proven); it is only checked against the header's day range.

A verifier must still decide whether the did:key is the device's (e.g. from the fleet's registry or certificate):
the file proves what that key signed, not whose key it is. ``LedgerTotals`` carries ``device_id`` and ``did`` for
that check.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge._fs import atomic_write
from edge.errors import InputError
from edge.gateway._checks import utc_day
from edge.gateway.errors import LedgerExportError, StoreError, UnknownDeviceError
from edge.gateway.store import Store
from edge.identity.did import public_from_did_key
from edge.identity.errors import InvalidDidError
from edge.identity.keys import validate_device_id
from edge.records import InferenceRecord, ReadingRecord
from edge.telemetry.envelope import Envelope, open_envelope
from edge.telemetry.schema import DEFAULT_LIMITS, EventRecord, LossNotice, TelemetryLimits

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "LedgerTotals", "export_ledger", "verify_export"]

EXPORT_FORMAT: Final = "edge-ledger-export"
EXPORT_VERSION: Final = 1
_HEADER_KEYS: Final = frozenset({"format", "version", "device_id", "did", "day_from", "day_to", "totals"})
_LINE_KEYS: Final = frozenset({"counter", "received_at", "envelope"})


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """What an export holds, recomputed from the envelopes.

    Attributes:
        device_id: the device.
        did: its did:key (the key every envelope verified under).
        envelopes: envelopes in the export.
        records: records in them (every type).
        inferences: inference records by model id.
        readings: reading records.
        events: event records.
        announced_lost: envelopes the device reported dropped in loss notices.
        first_counter: the lowest counter, None for an empty export.
        last_counter: the highest counter, None for an empty export.
        gaps: counters absent between ``first_counter`` and ``last_counter``.
    """

    device_id: str
    did: str
    envelopes: int
    records: int
    inferences: dict[str, int]
    readings: int
    events: int
    announced_lost: int
    first_counter: int | None
    last_counter: int | None
    gaps: int

    def claims(self) -> dict[str, Any]:
        """The totals as the header states them (every field but ``device_id`` and ``did``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("device_id", "did")}


class _Chain:
    """Totals and chain checks over envelopes fed in counter order; raises ``ValueError`` naming the problem."""

    def __init__(self) -> None:
        self.envelopes = self.records = self.readings = self.events = self.lost = self.gaps = 0
        self.inferences: Counter[str] = Counter()
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
                self.lost += r.envelopes_dropped

    def totals(self, device_id: str, did: str) -> LedgerTotals:
        return LedgerTotals(
            device_id=device_id,
            did=did,
            envelopes=self.envelopes,
            records=self.records,
            inferences=dict(sorted(self.inferences.items())),
            readings=self.readings,
            events=self.events,
            announced_lost=self.lost,
            first_counter=self.first,
            last_counter=None if self.last is None else self.last.counter,
            gaps=self.gaps,
        )


def export_ledger(
    store: Store,
    device_id: str,
    path: str | os.PathLike[str],
    *,
    day_from: str | None = None,
    day_to: str | None = None,
    limits: TelemetryLimits = DEFAULT_LIMITS,
) -> LedgerTotals:
    """Write a self-contained, re-verifiable export of a device's stored envelopes (atomically).

    The envelopes are verified as they are read (an export never vouches for bytes that do not verify). The file
    is built in memory before the atomic write: about 1.4 times the envelopes' bytes.

    Args:
        store: the gateway store.
        device_id: the device (revoked ones too: their past work stays provable).
        path: the file to write (replaced atomically).
        day_from: first UTC receipt day included (``YYYY-MM-DD``), None for no bound.
        day_to: last UTC receipt day included, None for no bound.
        limits: the limits the envelopes were accepted under.

    Returns:
        The totals written to the header.

    Raises:
        UnknownDeviceError: no such device.
        GatewayInputError: a day is not ``YYYY-MM-DD``.
        StoreError: the database failed, or a stored envelope does not verify or link (the store is corrupt).
        OSError: the file cannot be written.
    """
    device = store.device(device_id)
    if device is None:
        raise UnknownDeviceError(f"no device {device_id!r} is registered")
    try:
        key = public_from_did_key(device.did)
    except InvalidDidError as e:
        raise StoreError(f"device {device_id!r}: the stored did is invalid: {e}") from e
    if key.public_bytes(Encoding.Raw, PublicFormat.Raw) != device.public_key:
        raise StoreError(f"device {device_id!r}: the stored did and public key disagree")
    chain = _Chain()
    body = io.BytesIO()
    for stored in store.envelopes(device_id, day_from=day_from, day_to=day_to):
        try:
            env = open_envelope(stored.data, key, limits)
            if env.device_id != device_id or env.counter != stored.counter:
                raise ValueError(f"holds device {env.device_id!r} counter {env.counter}")
            chain.feed(env)
        except (InputError, ValueError) as e:
            raise StoreError(f"stored envelope {stored.counter} of {device_id!r} does not verify: {e}") from e
        line = {
            "counter": stored.counter,
            "received_at": stored.received_at,
            "envelope": base64.b64encode(stored.data).decode("ascii"),
        }
        body.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    totals = chain.totals(device_id, device.did)
    header = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "device_id": device_id,
        "did": device.did,
        "day_from": day_from,
        "day_to": day_to,
        "totals": totals.claims(),
    }
    atomic_write(path, json.dumps(header, separators=(",", ":")).encode() + b"\n" + body.getvalue())
    return totals


def _fail(line: int, problem: str) -> LedgerExportError:
    return LedgerExportError(f"line {line}: {problem}")


def _json_line(raw: bytes, n: int, max_len: int) -> dict[str, Any]:
    if len(raw) > max_len:
        raise _fail(n, f"longer than {max_len} bytes")
    if not raw.endswith(b"\n"):
        raise _fail(n, "truncated (no end of line)")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(n, f"not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise _fail(n, "not a JSON object")
    return obj


def _header(obj: dict[str, Any]) -> tuple[str, str, Ed25519PublicKey, str | None, str | None, dict[str, Any]]:
    if set(obj) != _HEADER_KEYS or obj["format"] != EXPORT_FORMAT:
        raise _fail(1, f"not an {EXPORT_FORMAT} header (expected keys {sorted(_HEADER_KEYS)})")
    if obj["version"] != EXPORT_VERSION or type(obj["version"]) is not int:
        raise _fail(1, f"version {obj['version']!r:.20}, this verifier reads {EXPORT_VERSION}")
    try:
        device_id = validate_device_id(obj["device_id"])
        key = public_from_did_key(obj["did"])
    except InputError as e:  # InvalidDeviceIdError, InvalidDidError
        raise _fail(1, str(e)) from e
    days = []
    for name in ("day_from", "day_to"):
        day = obj[name]
        if day is not None and (not isinstance(day, str) or len(day) != 10 or not _is_day(day)):
            raise _fail(1, f"{name} {day!r:.20} is not YYYY-MM-DD or null")
        days.append(day)
    if not isinstance(obj["totals"], dict):
        raise _fail(1, "totals is not an object")
    return device_id, obj["did"], key, days[0], days[1], obj["totals"]


def _is_day(day: str) -> bool:
    try:
        return datetime.date.fromisoformat(day).isoformat() == day
    except ValueError:
        return False


def _envelope_line(obj: dict[str, Any], n: int, day_from: str | None, day_to: str | None) -> tuple[int, bytes]:
    if set(obj) != _LINE_KEYS:
        raise _fail(n, f"expected exactly the keys {sorted(_LINE_KEYS)}")
    counter, received_at, encoded = obj["counter"], obj["received_at"], obj["envelope"]
    if type(counter) is not int or counter < 1:
        raise _fail(n, f"counter {counter!r:.20} is not a positive integer")
    if type(received_at) not in (int, float) or not 0 <= received_at <= 1e11:
        raise _fail(n, f"received_at {received_at!r:.20} is not epoch seconds")
    day = utc_day(received_at)
    if (day_from is not None and day < day_from) or (day_to is not None and day > day_to):
        raise _fail(n, f"received on {day}, outside the export's range {day_from}..{day_to}")
    if not isinstance(encoded, str):
        raise _fail(n, "envelope is not a base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(n, f"envelope is not valid base64: {e}") from e
    return counter, data


def verify_export(path: str | os.PathLike[str], *, limits: TelemetryLimits = DEFAULT_LIMITS) -> LedgerTotals:
    """Re-verify an export with nothing but the file (what a third party runs).

    Args:
        path: the export.
        limits: the limits envelopes are decoded under (the gateway's; the defaults unless it changed them).

    Returns:
        The recomputed totals, equal to the header's claims. The caller still decides whether ``did`` is the
        device's key.

    Raises:
        LedgerExportError: the first line that fails (malformed, a signature that does not verify, another
            device's envelope, counters out of order, a broken link), or the first total that disagrees.
        OSError: the file cannot be read.
    """
    # A line holds one base64 envelope plus a little JSON; anything longer is not ours and is not buffered whole.
    max_len = (limits.max_envelope_bytes + 2) // 3 * 4 + 256
    chain = _Chain()
    with Path(path).open("rb") as f:
        device_id, did, key, day_from, day_to, claims = _header(_json_line(f.readline(max_len + 1), 1, max_len))
        n = 1
        while raw := f.readline(max_len + 1):
            n += 1
            counter, data = _envelope_line(_json_line(raw, n, max_len), n, day_from, day_to)
            try:
                env = open_envelope(data, key, limits)
            except InputError as e:
                raise _fail(n, f"envelope does not verify: {e}") from e
            if env.device_id != device_id:
                raise _fail(n, f"envelope of device {env.device_id!r}, the export is of {device_id!r}")
            if env.counter != counter:
                raise _fail(n, f"line says counter {counter}, the signed envelope says {env.counter}")
            try:
                chain.feed(env)
            except ValueError as e:
                raise _fail(n, str(e)) from e
    totals = chain.totals(device_id, did)
    actual = totals.claims()
    for name, value in actual.items():
        if name not in claims:
            raise LedgerExportError(f"header: total {name!r} is missing")
        if claims[name] != value:
            raise LedgerExportError(f"total {name!r}: the header claims {claims[name]!r}, the envelopes give {value!r}")
    extra = set(claims) - set(actual)
    if extra:
        raise LedgerExportError(f"header: unknown totals {sorted(extra)}")
    return totals
