"""Choosing what a V4L2 camera captures: pixel format, size and frame rate, from what it offers (sans-IO).

The device enumerates its offers (``Offer``: a format, a size, the frame intervals at that size); ``choose`` picks
one from them, the configuration (``source.capture_format``, ``width``, ``height``, ``fps``) and the model's input
size. Nothing here touches a device: ``edge.sensing.v4l2.device`` does the enumerating and the setting.

The rules, in order:
- a format the configuration names is the only one considered; ``auto`` ranks what the preprocessing reads
  straight from the driver's buffer by its cost (NV12, then YUYV, RGB3, BGR3, GREY), and MJPG (decoded by
  libjpeg-turbo into a new RGB image) last;
- a configured size must be offered exactly; otherwise the smallest offered size that covers the model's input in
  both dimensions (less to convert, nothing to upscale), or, if none covers it, the largest;
- with ``auto``, the first format in rank order whose chosen size covers the model's input wins, so a webcam that
  offers its large sizes only as MJPG is read as MJPG when the raw sizes are too small, and raw otherwise;
- a configured rate picks the offered interval whose rate is nearest (a faster one on a tie); none configured
  keeps the driver's default rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from edge.errors import ConfigError
from edge.sensing.pixels import PixelFormat

__all__ = ["RAW_FORMATS", "Choice", "NegotiationError", "Offer", "choose", "describe_offers"]

# V4L2 fourcc -> the preprocessing's pixel format, in the order ``auto`` prefers them: NV12 has the fewest bytes
# per pixel of the raw formats, GREY drops colour, so it comes last.
RAW_FORMATS: Final = {
    "NV12": PixelFormat.NV12,
    "YUYV": PixelFormat.YUYV,
    "RGB3": PixelFormat.RGB888,
    "BGR3": PixelFormat.BGR888,
    "GREY": PixelFormat.GRAY8,
}
COMPRESSED_FORMATS: Final = ("MJPG",)
_RANK: Final = (*RAW_FORMATS, *COMPRESSED_FORMATS)


class NegotiationError(ConfigError):
    """The configuration asks for what the device does not offer; the message lists what it offers."""


@dataclass(frozen=True, slots=True)
class Offer:
    """One format and size the device can capture, with the frame intervals (seconds per frame) it offers there.

    ``intervals`` is empty when the device does not enumerate them.
    """

    fourcc: str
    width: int
    height: int
    intervals: tuple[Fraction, ...] = ()


@dataclass(frozen=True, slots=True)
class Choice:
    """What to set: the format, the size, and the frame interval (None: the driver's default)."""

    fourcc: str
    width: int
    height: int
    interval: Fraction | None

    @property
    def fps(self) -> float | None:
        """The chosen rate in frames per second, or None for the driver's default."""
        return None if self.interval is None else float(1 / self.interval)


def describe_offers(offers: Iterable[Offer]) -> str:
    """What a device offers, one format per clause: ``YUYV 640x480 (30, 25 fps), 1280x720 (10 fps); MJPG ...``."""
    by_format: dict[str, list[str]] = {}
    for o in offers:
        rates = ", ".join(_rate_text(i) for i in o.intervals)
        by_format.setdefault(o.fourcc, []).append(f"{o.width}x{o.height}" + (f" ({rates} fps)" if rates else ""))
    return "; ".join(f"{fmt} {', '.join(sizes)}" for fmt, sizes in by_format.items()) or "nothing"


def _rate_text(interval: Fraction) -> str:
    rate = 1 / interval
    return str(int(rate)) if rate.denominator == 1 else f"{float(rate):.4g}"


def _covers(o: Offer, model_size: tuple[int, int]) -> bool:
    return o.width >= model_size[0] and o.height >= model_size[1]


def _pick_size(offers: Sequence[Offer], model_size: tuple[int, int]) -> Offer:
    covering = [o for o in offers if _covers(o, model_size)]
    if covering:
        return min(covering, key=lambda o: (o.width * o.height, o.width))
    return max(offers, key=lambda o: (o.width * o.height, o.width))


def _pick_interval(offer: Offer, fps: float) -> Fraction | None:
    if fps <= 0 or not offer.intervals:
        return None
    want = Fraction(fps).limit_denominator(1001)
    return min(offer.intervals, key=lambda i: (abs(1 / i - want), i))


def choose(
    offers: Sequence[Offer],
    *,
    capture_format: str = "auto",
    width: int = 0,
    height: int = 0,
    fps: float = 0.0,
    model_size: tuple[int, int] = (0, 0),
    device: str = "the device",
) -> Choice:
    """Pick the format, size and rate to capture (the rules are in the module docstring).

    Args:
        offers: what the device enumerates, in any order; formats the preprocessing cannot read are ignored.
        capture_format: ``source.capture_format``: ``auto`` or a fourcc name.
        width, height: ``source.width`` / ``source.height``; 0 leaves that dimension to the rules.
        fps: ``source.fps``; 0 keeps the driver's default rate.
        model_size: the model input's (width, height), which the chosen size should cover.
        device: the device path, for the error message.

    Raises:
        NegotiationError: nothing offered matches; it names the key at fault and lists the device's offers.
    """
    usable = [o for o in offers if o.fourcc in _RANK]
    if not usable:
        raise NegotiationError(
            "source.capture_format",
            capture_format,
            f"a format edge reads ({', '.join(_RANK)}); {device} offers {describe_offers(offers)}",
        )
    if capture_format != "auto":
        usable = [o for o in usable if o.fourcc == capture_format]
        if not usable:
            raise NegotiationError(
                "source.capture_format", capture_format, f"a format {device} offers: {describe_offers(offers)}"
            )
    if width or height:
        sized = [o for o in usable if (not width or o.width == width) and (not height or o.height == height)]
        if not sized:
            asked = f"{width or '*'}x{height or '*'}"
            raise NegotiationError(
                "source.width" if width else "source.height",
                asked,
                f"a size {device} offers in {capture_format} format: {describe_offers(usable)}",
            )
        usable = sized
    by_format: dict[str, list[Offer]] = {}
    for o in usable:
        by_format.setdefault(o.fourcc, []).append(o)
    ranked = sorted(by_format, key=_RANK.index)
    picks = [_pick_size(by_format[f], model_size) for f in ranked]
    best = next((o for o in picks if _covers(o, model_size)), None)
    if best is None:
        best = max(picks, key=lambda o: (o.width * o.height, -_RANK.index(o.fourcc)))
    return Choice(best.fourcc, best.width, best.height, _pick_interval(best, fps))
