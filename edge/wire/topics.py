"""Every MQTT topic of the fleet, built and parsed in one place (sans-IO).

A device owns the namespace ``devices/<id>/``: the broker lets only that device publish its ``telemetry``, ``status``
and ``replies`` there, and only the fleet publish its ``commands`` and ``receipts`` (``edge.wire.receipts``,
retained). So the topic a message arrived on says who sent it, whatever the message claims; the parsers below return
a device id only when it is a valid one (``edge.identity.keys.validate_device_id``), never a string the fleet would
then use as a key.

The gateway reads telemetry through a shared subscription (``$share/<group>/devices/+/telemetry``: the processes of
one group split the load) and status directly (``devices/+/status``: retained messages are not shared).
"""

from __future__ import annotations

from typing import Final

from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id

__all__ = [
    "COMMANDS",
    "RECEIPTS",
    "REPLIES",
    "STATUS",
    "TELEMETRY",
    "device_topics",
    "gateway_subscriptions",
    "topic_device",
    "topic_device_any",
    "topic_route",
]

PREFIX: Final = "devices"
TELEMETRY: Final = "telemetry"
STATUS: Final = "status"
COMMANDS: Final = "commands"
REPLIES: Final = "replies"
RECEIPTS: Final = "receipts"


def device_topics(device_id: str) -> dict[str, str]:
    """The device's topics by role: ``telemetry``, ``status``, ``commands``, ``replies``, ``receipts``.

    Args:
        device_id: a device id (not checked here: the caller holds a validated one).
    """
    base = f"{PREFIX}/{device_id}"
    return {role: f"{base}/{role}" for role in (TELEMETRY, STATUS, COMMANDS, REPLIES, RECEIPTS)}


def gateway_subscriptions(share_group: str) -> list[str]:
    """What a gateway process subscribes to: its group's share of all telemetry, and every status."""
    return [f"$share/{share_group}/{PREFIX}/+/{TELEMETRY}", f"{PREFIX}/+/{STATUS}"]


def _valid(device_id: str) -> str | None:
    try:
        return validate_device_id(device_id)
    except InvalidDeviceIdError:
        return None


def topic_device(topic: object) -> str | None:
    """The device id of a telemetry topic.

    Args:
        topic: the topic as received.

    Returns:
        ``<id>`` of ``devices/<id>/telemetry`` when ``<id>`` is a valid device id, else None.
    """
    if not isinstance(topic, str):
        return None
    parts = topic.split("/", 3)
    if len(parts) != 3 or parts[0] != PREFIX or parts[2] != TELEMETRY:
        return None
    return _valid(parts[1])


def topic_route(topic: object) -> tuple[str, str | None]:
    """Where a message goes: ``(TELEMETRY, id)`` for ``devices/<id>/telemetry``, ``(STATUS, id)`` for
    ``devices/<id>/status`` (``<id>`` a valid device id), else ``("other", topic_device_any(topic))``."""
    if isinstance(topic, str):
        parts = topic.split("/", 3)
        if len(parts) == 3 and parts[0] == PREFIX and parts[2] in (TELEMETRY, STATUS):
            device = _valid(parts[1])
            return (parts[2], device) if device is not None else ("other", None)
    return "other", topic_device_any(topic)


def topic_device_any(topic: object) -> str | None:
    """The device whose namespace a topic is in (``devices/<id>/...``, a valid id), else None.

    The broker lets only that device write there, so this is who sent it, whatever the message says.
    """
    if not isinstance(topic, str):
        return None
    parts = topic.split("/", 2)
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    return _valid(parts[1])
