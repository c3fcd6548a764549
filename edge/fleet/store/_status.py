"""Device status messages to stored rows, and how a new message changes the stored one. Sans-IO.

A status message is a box's word on its own topic (``devices/<id>/status``, which the broker lets only that box
write), parsed here under bounds before anything is stored: at most ``MAX_STATUS_BYTES`` of strict UTF-8 JSON (no
NaN or infinities, no duplicate keys, no lone surrogates), an object nested at most ``MAX_STATUS_DEPTH`` deep.
Anything else is a ``GatewayInputError`` (the message is quarantined), never another exception.

Invariants:
- The content is the device's word and is kept as received (``info``, canonical JSON); only the fields the
  operator view needs are extracted, leniently: a ``state`` other than ``online``/``offline`` becomes ``unknown``,
  a field of the wrong type becomes None. Only what cannot be stored at all is an error.
- ``since`` moves only when the state changes; ``last_seen`` moves only when the message differs from the stored
  one (a retained message delivered again when the gateway resubscribes is not a sign of life); a message
  without a model keeps the model of the last one that named it (the birth message does).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge.fleet._json import depth_ok, strict_loads
from edge.fleet.errors import GatewayInputError
from edge.fleet.store._checks import check_device_id, check_time
from edge.wire._bounds import INT64_MAX

__all__ = [
    "MAX_STATUS_BYTES",
    "MAX_STATUS_CHARS",
    "MAX_STATUS_DEPTH",
    "StatusRow",
    "decode_status",
    "merge_status",
    "parse_status",
]

MAX_STATUS_BYTES: Final = 16 * 1024  # the raw message; a box's birth message is about 300 bytes
MAX_STATUS_CHARS: Final = 64 * 1024  # of the re-encoded JSON (escapes can grow it)
MAX_STATUS_DEPTH: Final = 8  # containers inside containers; a box's status is two deep
_STATES: Final = frozenset({"online", "offline"})
_MAX_TEXT: Final = 128


@dataclass(frozen=True, slots=True)
class StatusRow:
    """One row of the ``statuses`` table (columns in table order after ``device_id``)."""

    state: str
    reason: str | None
    since: float
    last_seen: float
    model: str | None
    outbox_backlog: int | None
    info: str


def decode_status(device_id: str, payload: bytes) -> dict[str, Any] | None:
    """Decode a status message under the bounds of the module docstring.

    Args:
        device_id: the device of the topic (for messages).
        payload: the message as received.

    Returns:
        The JSON object, or None for an empty message (a retained status being cleared).

    Raises:
        GatewayInputError: oversized, not strict UTF-8 JSON, not an object, or nested too deep.
    """
    if not isinstance(payload, bytes | bytearray):
        raise GatewayInputError(f"status of {device_id!r} is not bytes")
    if len(payload) > MAX_STATUS_BYTES:
        raise GatewayInputError(f"status of {device_id!r} is {len(payload)} bytes, limit {MAX_STATUS_BYTES}")
    if not payload:
        return None
    try:
        body = strict_loads(bytes(payload).decode("utf-8"), MAX_STATUS_DEPTH)
        # json turns "\ud800" escapes into lone surrogates, which no database can store as text.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError) as e:  # bad UTF-8, JSONDecodeError, NaN, duplicate keys, depth, surrogates
        raise GatewayInputError(f"status of {device_id!r} is not strict UTF-8 JSON: {str(e)[:120]}") from e
    if not isinstance(body, dict):
        raise GatewayInputError(f"status of {device_id!r} is not a JSON object: {type(body).__name__}")
    return body


def parse_status(device_id: str, status: Mapping[str, Any], at: float) -> StatusRow:
    """The row a status message would make for a device never heard before.

    Args:
        device_id: the device id of the status topic.
        status: the decoded JSON object.
        at: the gateway's receipt time.

    Returns:
        The row.

    Raises:
        GatewayInputError: invalid device id or time, not a strict JSON-encodable mapping, nested deeper than
            ``MAX_STATUS_DEPTH``, or over 64 KiB as JSON.
    """
    check_device_id(device_id)
    at = check_time(at, "status time")
    if not isinstance(status, Mapping):
        raise GatewayInputError(f"status of {device_id!r} is not a JSON object: {type(status).__name__}")
    try:
        if not depth_ok(status, MAX_STATUS_DEPTH):
            raise ValueError(f"nested deeper than {MAX_STATUS_DEPTH}")
        # Canonical, strict JSON that every backend stores as text: no NaN, no lone surrogates (encode checks).
        info = json.dumps(dict(status), ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
        info.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        raise GatewayInputError(f"status of {device_id!r} is not JSON: {str(e)[:120]}") from e
    if len(info) > MAX_STATUS_CHARS:
        raise GatewayInputError(f"status of {device_id!r} is {len(info)} characters, limit {MAX_STATUS_CHARS}")
    state, reason, model, backlog = (status.get(k) for k in ("state", "reason", "model", "outbox_backlog"))
    return StatusRow(
        state=state if isinstance(state, str) and state in _STATES else "unknown",
        reason=reason[:_MAX_TEXT] if isinstance(reason, str) else None,
        since=at,
        last_seen=at,
        model=model[:_MAX_TEXT] if isinstance(model, str) else None,
        outbox_backlog=backlog if type(backlog) is int and 0 <= backlog <= INT64_MAX else None,
        info=info,
    )


def merge_status(old: StatusRow, new: StatusRow) -> StatusRow:
    """The stored row after ``new`` (from ``parse_status``) arrives for a device whose row is ``old``.

    Args:
        old: the stored row.
        new: the row of the new message.

    Returns:
        The row to store.
    """
    return dataclasses.replace(
        new,
        since=new.since if new.state != old.state else old.since,
        last_seen=old.last_seen if new.info == old.info else max(old.last_seen, new.last_seen),
        model=new.model or old.model,
    )
