"""Device status messages to stored rows, and how a new message changes the stored one. Sans-IO.

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

from edge.gateway._checks import check_device_id, check_time
from edge.gateway.errors import GatewayInputError

__all__ = ["MAX_STATUS_CHARS", "StatusRow", "merge_status", "parse_status"]

MAX_STATUS_CHARS: Final = 64 * 1024  # of the re-encoded JSON; the ingest loop bounds the raw message (16 KiB)
_STATES: Final = frozenset({"online", "offline"})
_MAX_TEXT: Final = 128
_UINT_MAX: Final = (1 << 63) - 1


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


def parse_status(device_id: str, status: Mapping[str, Any], at: float) -> StatusRow:
    """The row a status message would make for a device never heard before.

    Args:
        device_id: the device id of the status topic.
        status: the decoded JSON object.
        at: the gateway's receipt time.

    Returns:
        The row.

    Raises:
        GatewayInputError: invalid device id or time, not a JSON-encodable mapping, or over 64 KiB as JSON.
    """
    check_device_id(device_id)
    at = check_time(at, "status time")
    if not isinstance(status, Mapping):
        raise GatewayInputError(f"status of {device_id!r} is not a JSON object: {type(status).__name__}")
    try:
        # NaN is allowed: json.loads accepts it from the wire, and the ingest loop must not fail on it.
        info = json.dumps(dict(status), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise GatewayInputError(f"status of {device_id!r} is not JSON: {e}") from e
    if len(info) > MAX_STATUS_CHARS:
        raise GatewayInputError(f"status of {device_id!r} is {len(info)} characters, limit {MAX_STATUS_CHARS}")
    state, reason, model, backlog = (status.get(k) for k in ("state", "reason", "model", "outbox_backlog"))
    return StatusRow(
        state=state if isinstance(state, str) and state in _STATES else "unknown",
        reason=reason[:_MAX_TEXT] if isinstance(reason, str) else None,
        since=at,
        last_seen=at,
        model=model[:_MAX_TEXT] if isinstance(model, str) else None,
        outbox_backlog=backlog if type(backlog) is int and 0 <= backlog <= _UINT_MAX else None,
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
