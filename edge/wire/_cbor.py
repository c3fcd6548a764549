"""Strict CBOR decoding for untrusted bytes: the one place the telemetry layer configures cbor2's decoder.

Invariants of every decode here: no CBOR tags at all (cbor2's semantic decoders would otherwise build datetimes,
bignums, regexes, sets and shared, even cyclic, values from input), no duplicate map keys, no indefinite lengths, a
container depth bound, and no trailing bytes after the item. cbor2 raises a handful of exception types for bad input;
they are translated to the caller's typed error here.
"""

from __future__ import annotations

import functools
import io
from typing import Any, NoReturn

import cbor2

__all__ = ["DECODE_ERRORS", "loads_strict", "new_decoder", "read_head"]

# Every exception cbor2 is seen to raise on hostile input (hypothesis-fuzzed in the tests): its own, and the
# ValueError/TypeError/OverflowError family some decoders let through.
DECODE_ERRORS = (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, KeyError, IndexError, RecursionError)


def _reject_tag(*_args: object) -> NoReturn:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed here")


# cbor2 consults semantic_decoders for the tags it knows (all below 2**16) before its built-ins, and tag_hook for
# the rest: together they refuse every tag.
_NO_SEMANTIC_TAGS: dict[int, Any] = dict.fromkeys(range(1 << 16), _reject_tag)


@functools.cache
def _semantic_except(tag: int) -> dict[int, Any]:
    return {k: v for k, v in _NO_SEMANTIC_TAGS.items() if k != tag}


def new_decoder(fp: io.BytesIO, max_depth: int, *, allow_tag: int | None = None) -> cbor2.CBORDecoder:
    """A strict decoder over ``fp``.

    Args:
        fp: the bytes to decode.
        max_depth: the maximum container nesting.
        allow_tag: one tag number returned as ``cbor2.CBORTag`` instead of refused (COSE's 18).

    Returns:
        The decoder.
    """
    semantic = _NO_SEMANTIC_TAGS if allow_tag is None else _semantic_except(allow_tag)

    def tag_hook(tag: cbor2.CBORTag, _immutable: bool) -> cbor2.CBORTag:
        if tag.tag != allow_tag:
            _reject_tag()
        return tag

    return cbor2.CBORDecoder(
        fp,
        semantic_decoders=semantic,
        tag_hook=tag_hook,
        max_depth=max_depth,
        allow_indefinite=False,
        allow_duplicate_keys=False,
    )


def loads_strict(data: bytes, max_depth: int, *, allow_tag: int | None = None) -> Any:
    """Decode exactly one CBOR item that fills ``data``.

    Args:
        data: the bytes.
        max_depth: the maximum container nesting.
        allow_tag: see ``new_decoder``.

    Returns:
        The item (tags other than ``allow_tag`` refused).

    Raises:
        cbor2.CBORDecodeError: or another of ``DECODE_ERRORS``: not exactly one well-formed item within the rules.
    """
    fp = io.BytesIO(data)
    item = new_decoder(fp, max_depth, allow_tag=allow_tag).decode()
    if fp.tell() != len(data):
        raise cbor2.CBORDecodeError(f"{len(data) - fp.tell()} trailing bytes after the CBOR item")
    return item


def read_head(fp: io.BytesIO) -> tuple[int, int]:
    """Read one CBOR head (initial byte and argument) without the content.

    Used to walk a map or array header by hand so a count can be checked before any element is decoded.

    Args:
        fp: positioned on a head.

    Returns:
        (major type 0-7, argument).

    Raises:
        cbor2.CBORDecodeError: end of data, indefinite length or a reserved additional-information value.
    """
    first = fp.read(1)
    if not first:
        raise cbor2.CBORDecodeError("premature end of CBOR data")
    major, info = first[0] >> 5, first[0] & 0x1F
    if info < 24:
        return major, info
    if info > 27:
        raise cbor2.CBORDecodeError("indefinite or reserved CBOR length")
    size = 1 << (info - 24)
    raw = fp.read(size)
    if len(raw) != size:
        raise cbor2.CBORDecodeError("premature end of CBOR data")
    return major, int.from_bytes(raw, "big")
