"""The end of an enrollment: the box's first envelope, sealed into its real outbox and published until the fleet's
signed receipt covers it. The receipt is the proof that the whole path works: certificate, broker rights, the
gateway's verification and the store."""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge.config import Config
from edge.wire.schema import EventRecord

__all__ = ["FirstEnvelope", "publish_first_envelope"]

_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class FirstEnvelope:
    """How the first envelope fared.

    Attributes:
        receipted: whether a fleet receipt covered it within the time given.
        seconds: from the start of the call to the receipt (or to giving up).
        detail: why not, when not (the transport's last failure, or the lack of a receipt key).
    """

    receipted: bool
    seconds: float
    detail: str = ""


def publish_first_envelope(cfg: Config, *, device_id: str, timeout_s: float) -> FirstEnvelope:
    """Seal an ``enrolled`` event into the outbox and publish it until a receipt covers it or ``timeout_s`` passes.

    The envelope stays in the outbox either way: the service delivers it later if this call gives up.

    Args:
        cfg: the box's configuration, its drop-in included (the broker address the enrollment wrote).
        device_id: the enrolled id.
        timeout_s: how long to wait for the receipt.
    """
    from edge.telemetry.device import DeviceTelemetry  # noqa: PLC0415 -- paho loads only for this step

    start = time.monotonic()
    telemetry = DeviceTelemetry(cfg, model_id="", model_sha256="", backend="enrollment")
    try:
        telemetry.sink.write([EventRecord(timestamp=time.time(), kind="box.enrolled", data={"device": device_id})])
        telemetry.sink.flush()
        telemetry.start()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            if telemetry.outbox.delivery().stored >= 1 or telemetry.outbox.delivery().acked_envelopes >= 1:
                return FirstEnvelope(True, time.monotonic() - start)
            time.sleep(_POLL_S)
        failure = getattr(telemetry.transport, "last_failure", None)
        detail = str(getattr(failure, "detail", "") or "no receipt from the fleet yet")
        return FirstEnvelope(False, time.monotonic() - start, detail)
    finally:
        telemetry.close()
