"""docs/gateway.example.toml: every key the gateway's loader knows, at its default, with its range; it cannot go stale.

The file is read by the real loader (``load_gateway_config``), and its keys and the ranges its comments state are
compared with the declarations in edge/fleet/config.py: a key added, removed or re-ranged there fails here until the
example says so.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.fleet.config import GatewayConfig, IngestConfig, load_gateway_config, parse_gateway_config
from edge.toml_config import Setting, section_types, settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE = DOCS / "gateway.example.toml"


def _spec() -> dict[str, Setting]:
    return {f"{name}.{s.key}": s for name, section in section_types(GatewayConfig).items() for s in settings(section)}


def _lines() -> dict[str, str]:
    """Each key's line in the example (the line that sets it), by dotted key."""
    section, out = "", {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"(\w+)\s*=", line):
            out[f"{section}.{m.group(1)}"] = line
    return out


def test_the_example_loads_with_the_real_loader_and_is_all_defaults() -> None:
    cfg = load_gateway_config(EXAMPLE, resolve_id=False)
    assert cfg.gateway.fleet_dir == DOCS / "fleet"  # relative to the file's directory, not the working directory
    assert cfg == GatewayConfig(gateway=IngestConfig(fleet_dir=DOCS / "fleet"))
    assert parse_gateway_config(tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))) == GatewayConfig()


def test_the_example_sets_every_key_the_loader_knows_and_no_other() -> None:
    doc = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    shown = {f"{name}.{key}" for name, table in doc.items() for key in table}
    assert shown == _spec().keys(), {
        "missing from the example": sorted(_spec().keys() - shown),
        "not a key": sorted(shown - _spec().keys()),
    }
    assert _lines().keys() == shown  # each key on a line of its own, where its comment can say what it is


_NUMBER = r"-?\d+(?:\.\d+)?(?:e\+?\d+)?"


def _bounds(key: str, s: Setting) -> set[float]:
    """The bounds a numeric key's converter enforces, as its error messages state them for absurd values."""
    found: set[float] = set()
    for probe in (-(10**30), 10**30):
        try:
            s.convert(key, probe)
        except ConfigError as e:
            # "an integer >= 1 and <= 5000", "a TCP port number 1..65535", "above 0 and at most 1e9", ...
            for m in re.finditer(rf"(?:>=|<=|above|at most) ({_NUMBER})|({_NUMBER})\.\.({_NUMBER})", e.expected):
                found.update(float(g) for g in m.groups() if g is not None)
    return found


def _numeric(s: Setting) -> bool:
    return isinstance(s.default, int | float) and not isinstance(s.default, bool)


@pytest.mark.parametrize("key", sorted(k for k, s in _spec().items() if _numeric(s)))
def test_the_example_states_each_numeric_keys_range(key: str) -> None:
    bounds = _bounds(key, _spec()[key])
    assert bounds, f"{key}: its converter states no range"
    line = _lines()[key]
    stated = line.partition("#")[2].partition(":")[0]  # "1..5000: what it is" -> "1..5000"
    assert bounds <= {float(x) for x in re.findall(_NUMBER, stated)}, (key, sorted(bounds), line)


def test_a_key_without_a_comment_is_a_stale_example() -> None:
    # Every key says what it is: on its line, or (a section's self-evident switch) in the section header's comment.
    text = EXAMPLE.read_text(encoding="utf-8").splitlines()
    headers = {m.group(1): line for line in text if (m := re.match(r"\[(\w+)\]", line))}
    for key, line in _lines().items():
        section = key.split(".")[0]
        assert "#" in line or "#" in headers[section], key


def test_docs_gateway_md_points_at_the_example() -> None:
    assert "gateway.example.toml" in (DOCS / "gateway.md").read_text(encoding="utf-8")
