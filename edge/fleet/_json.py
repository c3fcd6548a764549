"""Strict JSON for what the gateway reads from outside (box status messages, ledger exports). Sans-IO.

``json.loads`` alone accepts NaN and infinities, keeps the last of duplicate keys (so two readers of one document
can see different values), and nests as deep as the interpreter's recursion allows. ``strict_loads`` refuses all
three, with the nesting bounded by the caller.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["depth_ok", "strict_loads"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def depth_ok(value: Any, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` containers deep (iterative; stops at the first level too deep)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def strict_loads(raw: str | bytes, max_depth: int) -> Any:
    """Parse strict JSON: no NaN or infinities, no duplicate keys, at most ``max_depth`` containers deep.

    Raises:
        ValueError: anything else (``UnicodeDecodeError`` for bytes that are not UTF-8 is one).
    """
    try:
        value = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_unique)
    except RecursionError as e:  # the C scanner's own depth guard, before ours
        raise ValueError(f"nested deeper than {max_depth}") from e
    if not depth_ok(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth}")
    return value
