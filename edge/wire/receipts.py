"""Delivery receipts: the fleet's signed word that it stored a box's envelopes (sans-IO).

MQTT acknowledges per hop: a PUBACK says the broker has a message, not that any database does. A receipt closes the
loop from box to database. The gateway signs one after the transaction that stored the box's envelopes committed,
with the fleet receipt key (Ed25519, its own key, provisioned to every box as ``fleet-receipts.pub``), and publishes
it retained on ``devices/<id>/receipts``. The box deletes an envelope from its outbox only when a receipt says it is
stored (docs/telemetry.md, "Receipts", has the CDDL and a worked example).

Format: COSE_Sign1 (tag 18), protected header ``{1: -8, 4: h'72656365697074'}`` (alg EdDSA, kid "receipt"), no
external AAD, payload the canonical CBOR map::

    { 1: 1 (version), 2: device id, 3: stored (uint), 4: stored_hash (bstr 32), 5: head (uint),
      6: head_hash (bstr 32), 7: from (uint), 8: holes [* [lo, hi]], 9: issued (float), 10: gateway id }

Meaning, for the device it names:
- every counter ``1 .. stored`` is stored (``stored_hash``: the hash of envelope ``stored``, 32 zero bytes for 0);
- ``head`` is the highest counter stored (``head_hash`` its hash); ``stored <= from <= head``;
- every counter in ``from + 1 .. head`` is stored unless a listed hole contains it. ``holes`` are disjoint,
  ascending ``[lo, hi]`` ranges inside ``from + 1 .. head - 1``, at most ``MAX_HOLES``. When the gateway knows more
  holes than that, it lists the highest ones and raises ``from`` above the rest, so the receipt stays small and still
  speaks for the counters a box is most likely to hold;
- counters in ``stored + 1 .. from`` are not described, counters above ``head`` not yet stored.

So one receipt covers many envelopes, and it is cumulative: a later one never takes back what an earlier one said,
because the fleet never forgets a stored envelope. A counter the box dropped (announced by a loss notice) stays a
hole: receipts speak only of what is stored, so no receipt can make a box delete an envelope the fleet lacks.

Invariants:
- ``verify_receipt`` checks the size, the COSE structure and the signature over the raw bytes before it decodes the
  payload, then every field's type and range and the ordering rules above; a receipt that fails raises
  ``ReceiptError`` and covers nothing.
- ``Receipt.covers`` is exact: true only for counters the receipt states are stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id
from edge.wire._bounds import MAX_COUNTER, MAX_EPOCH
from edge.wire._cbor import DECODE_ERRORS, loads_strict
from edge.wire.cose import ALG_EDDSA, HEADER_ALG, HEADER_KID, decode_sign1, sign1
from edge.wire.errors import BadSignatureError, MalformedEnvelopeError

__all__ = [
    "GENESIS_HASH",
    "MAX_HOLES",
    "MAX_RECEIPT_BYTES",
    "RECEIPT_KID",
    "Receipt",
    "ReceiptError",
    "holes_between",
    "sign_receipt",
    "verify_receipt",
]

RECEIPT_KID: Final = b"receipt"
VERSION: Final = 1
# 64 ranges are 64 separate outages the box's outbox still spans; more are listed on a later receipt as the lower
# ones fill. With them a receipt is at most ~1.5 KB.
MAX_HOLES: Final = 64
MAX_RECEIPT_BYTES: Final = 4096
GENESIS_HASH: Final = bytes(32)
_HASH_LEN: Final = 32
_MAX_GATEWAY_ID: Final = 128
_KEYS: Final = frozenset(range(1, 11))
_PAYLOAD_MAX_DEPTH: Final = 4


class ReceiptError(MalformedEnvelopeError):
    """A receipt that is not one: malformed, oversized, inconsistent, or not signed by the fleet receipt key."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the fleet states it has stored for one device (see the module docstring for each field's meaning)."""

    device_id: str
    stored: int
    stored_hash: bytes
    head: int
    head_hash: bytes
    start: int  # "from" on the wire: holes describe start + 1 .. head
    holes: tuple[tuple[int, int], ...]
    issued: float
    gateway: str

    def covers(self, counter: int) -> bool:
        """Whether the receipt states that envelope ``counter`` is stored."""
        if counter <= self.stored:
            return counter >= 1
        if counter <= self.start or counter > self.head:
            return False
        return not any(lo <= counter <= hi for lo, hi in self.holes)

    def stored_ranges(self) -> Iterator[tuple[int, int]]:
        """The counters the receipt covers, as disjoint ascending ``(lo, hi)`` ranges."""
        if self.stored >= 1:
            yield 1, self.stored
        lo = self.start + 1
        for h_lo, h_hi in self.holes:
            if lo <= h_lo - 1:
                yield lo, h_lo - 1
            lo = h_hi + 1
        if lo <= self.head:
            yield lo, self.head

    def in_holes(self, counter: int) -> bool:
        """Whether a listed hole contains ``counter``: the fleet saw later envelopes but not this one."""
        return any(lo <= counter <= hi for lo, hi in self.holes)

    def summary(self) -> dict[str, Any]:
        """The receipt as JSON-ready values (status messages, ``edge telemetry status``)."""
        return {
            "stored": self.stored,
            "head": self.head,
            "from": self.start,
            "holes": [list(h) for h in self.holes],
            "issued": self.issued,
            "gateway": self.gateway,
        }


def _check(r: Receipt) -> None:
    """Raise ``ValueError`` unless ``r`` obeys the ordering rules of the format."""
    for name, v in (("stored", r.stored), ("head", r.head), ("from", r.start)):
        if type(v) is not int or not 0 <= v <= MAX_COUNTER:
            raise ValueError(f"{name} must be a counter in 0..2**53, got {v!r:.40}")
    if not r.stored <= r.start <= r.head:
        raise ValueError(f"stored {r.stored} <= from {r.start} <= head {r.head} does not hold")
    for name, h in (("stored_hash", r.stored_hash), ("head_hash", r.head_hash)):
        if type(h) is not bytes or len(h) != _HASH_LEN:
            raise ValueError(f"{name} must be {_HASH_LEN} bytes")
    if r.stored == 0 and r.stored_hash != GENESIS_HASH:
        raise ValueError("stored_hash must be 32 zero bytes when stored is 0")
    if r.head == r.stored and r.head_hash != r.stored_hash:
        raise ValueError("head_hash must equal stored_hash when head equals stored")
    if len(r.holes) > MAX_HOLES:
        raise ValueError(f"more than {MAX_HOLES} holes")
    if r.holes and r.start == r.head:
        raise ValueError("holes listed with nothing described (from = head)")
    last = r.start
    for hole in r.holes:
        if len(hole) != 2 or any(type(x) is not int for x in hole):
            raise ValueError(f"a hole must be [lo, hi] of counters, got {hole!r:.40}")
        lo, hi = hole
        if not last < lo <= hi < r.head:
            raise ValueError(f"hole [{lo}, {hi}] out of order or outside from + 1 .. head - 1")
        last = hi + 1  # adjacent holes would be one hole: the gateway merges them
    if not (isinstance(r.issued, float) and math.isfinite(r.issued) and 0 <= r.issued <= MAX_EPOCH):
        raise ValueError(f"issued must be epoch seconds, got {r.issued!r:.40}")
    if type(r.gateway) is not str or len(r.gateway) > _MAX_GATEWAY_ID:
        raise ValueError("gateway must be a string of at most 128 characters")


def sign_receipt(receipt: Receipt, key: Ed25519PrivateKey) -> bytes:
    """Encode and sign a receipt with the fleet receipt key.

    Args:
        receipt: what the fleet states (checked against the format's rules first).
        key: the fleet receipt key.

    Returns:
        The COSE_Sign1 bytes to publish on ``devices/<id>/receipts``.

    Raises:
        ReceiptError: the receipt breaks a rule of the format (a bug of the caller: nothing is signed).
    """
    try:
        validate_device_id(receipt.device_id)
        _check(receipt)
    except (ValueError, InvalidDeviceIdError) as e:
        raise ReceiptError(f"cannot sign receipt: {e}") from e
    payload = {
        1: VERSION,
        2: receipt.device_id,
        3: receipt.stored,
        4: receipt.stored_hash,
        5: receipt.head,
        6: receipt.head_hash,
        7: receipt.start,
        8: [list(h) for h in receipt.holes],
        9: float(receipt.issued),
        10: receipt.gateway,
    }
    data = sign1(
        cbor2.dumps(payload, canonical=True),
        key,
        protected={HEADER_ALG: ALG_EDDSA, HEADER_KID: RECEIPT_KID},
        unprotected={},
    )
    if len(data) > MAX_RECEIPT_BYTES:  # cannot happen within MAX_HOLES and the id bounds; never publish one anyway
        raise ReceiptError(f"receipt is {len(data)} bytes, more than {MAX_RECEIPT_BYTES}")
    return data


def verify_receipt(data: bytes, key: Ed25519PublicKey, device_id: str) -> Receipt:
    """Check a receipt for this device: size, structure, signature, then every field.

    Args:
        data: the message as received.
        key: the fleet receipt key (``fleet-receipts.pub``).
        device_id: this device's id; a receipt for another device is refused.

    Returns:
        The receipt.

    Raises:
        ReceiptError: oversized, malformed, wrongly signed, for another device, or breaking a rule of the format.
    """
    if not isinstance(data, bytes) or len(data) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"a receipt is bytes of at most {MAX_RECEIPT_BYTES}")
    try:
        msg = decode_sign1(data)
        if msg.protected.get(HEADER_KID) != RECEIPT_KID or set(msg.protected) != {HEADER_ALG, HEADER_KID}:
            raise ReceiptError("protected header must be {1: -8, 4: 'receipt'}")
        if msg.unprotected:
            raise ReceiptError("unprotected header must be empty")
        msg.verify(key)
    except BadSignatureError as e:
        raise ReceiptError("receipt signature does not verify with the fleet receipt key") from e
    except ReceiptError:
        raise
    except MalformedEnvelopeError as e:
        raise ReceiptError(f"not a receipt: {e}") from e
    try:
        body = loads_strict(msg.payload, _PAYLOAD_MAX_DEPTH)
    except DECODE_ERRORS as e:
        raise ReceiptError(f"receipt payload is not well-formed CBOR: {e}") from e
    if type(body) is not dict or set(body) != _KEYS:
        raise ReceiptError("receipt payload must be a map with keys 1..10 exactly")
    if body[1] != VERSION or type(body[1]) is not int:
        raise ReceiptError(f"unsupported receipt version {body[1]!r:.20}")
    holes = body[8]
    if type(holes) is not list or len(holes) > MAX_HOLES or any(type(h) is not list for h in holes):
        raise ReceiptError(f"holes must be an array of at most {MAX_HOLES} [lo, hi] pairs")
    issued = body[9]
    try:
        r = Receipt(
            device_id=validate_device_id(body[2]),
            stored=body[3],
            stored_hash=body[4],
            head=body[5],
            head_hash=body[6],
            start=body[7],
            holes=tuple(tuple(h) for h in holes),  # shapes checked by _check
            issued=float(issued) if type(issued) in (int, float) else issued,
            gateway=body[10],
        )
        _check(r)
    except (ValueError, TypeError, InvalidDeviceIdError) as e:
        raise ReceiptError(f"invalid receipt: {e}") from e
    if r.device_id != device_id:
        raise ReceiptError(f"receipt is for device {r.device_id!r}, not {device_id!r}")
    return r


def holes_between(
    missing: Sequence[tuple[int, int]], stored: int, head: int
) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Choose ``from`` and the holes to list from every missing range a store knows of (the gateway's side).

    Args:
        missing: the open missing ranges above ``stored``, ascending and disjoint, inside ``stored + 1 .. head - 1``.
        stored: the receipt's ``stored``.
        head: the receipt's ``head``.

    Returns:
        ``(from, holes)``: all of them when they fit ``MAX_HOLES``, else the highest ``MAX_HOLES`` with ``from`` at the
        end of the highest one left out.
    """
    if len(missing) <= MAX_HOLES:
        return stored, tuple(missing)
    kept = tuple(missing[-MAX_HOLES:])
    start = missing[-MAX_HOLES - 1][1]
    return min(start, head), kept
