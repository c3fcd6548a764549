"""Reading a TOML configuration file into frozen dataclasses, by declaration (the box's and the gateway's).

A section is a frozen dataclass whose fields are its keys; each field states, in one line, its type, the converter
that validates a value from the file (``Annotated`` metadata) and its default::

    @dataclass(frozen=True, slots=True)
    class LogConfig:
        level: Annotated[str, one_of(("debug", "info", "warning", "error"))] = "info"

A document is a frozen dataclass whose fields are sections (``parse_document``). ``dump_toml`` writes the flat
documents these files are (tables of strings, numbers, booleans and lists of them) back as TOML.

Invariants:
- The file is read bounded (``MAX_TOML_BYTES``) before it is parsed.
- Every error is a ``ConfigError(key, value, expected)`` naming the dotted key (``"<file>"`` for the file itself),
  the value (credentials masked, see ``shown``) and what was expected.
- A document's errors are reported at once: every unknown key (each with the nearest known key), then every bad
  value, in one ``ConfigErrors`` (a ``ConfigError`` whose ``errors`` lists them, its message one line each). A
  single error is raised as itself.
- Unknown keys come before bad values; a key missing from the file takes the field's default.
- A converter takes ``(dotted_key, value)`` and returns the typed value or raises ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from edge.errors import ConfigError
from edge.log import REDACTED, redact

__all__ = [
    "MAX_TOML_BYTES",
    "TCP_PORTS",
    "ConfigErrors",
    "Converter",
    "Setting",
    "all_errors",
    "boolean",
    "dump_toml",
    "float_at_least",
    "float_between",
    "fs_path",
    "gather",
    "host_name",
    "in_file",
    "int_between",
    "number_text",
    "one_of",
    "parse_document",
    "parse_section",
    "path_or_disabled",
    "read_optional_toml",
    "read_toml",
    "section_types",
    "settings",
    "shown",
    "string",
    "tcp_port",
]

T = TypeVar("T")
D = TypeVar("D")

Converter = Callable[[str, Any], T]
"""Validates the value of a dotted key and returns it typed; raises ``ConfigError``."""

MAX_TOML_BYTES = 1024 * 1024
"""The largest configuration file read (a full one is a few KiB)."""


# -- several errors at once -----------------------------------------------------------------------------------------


class ConfigErrors(ConfigError):  # noqa: N818 -- several ConfigError, named for what it holds
    """Several configuration errors found at once (``gather``): an operator fixes them all in one edit.

    ``key``, ``value`` and ``expected`` are the first error's, so a handler of one ``ConfigError`` still works; the
    message is a short block: a line that counts them, then every error indented on a line of its own, so that
    ``edge: error: `` before it reads well::

        3 configuration errors:
          config key 'model.thread': got 2, expected no such key (did you mean 'model.threads'?)
          ...
    """

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(e for x in errors for e in all_errors(x))
        if len(self.errors) < 2:
            raise ValueError("ConfigErrors holds two errors or more: raise a single one as itself")
        first = self.errors[0]
        super().__init__(first.key, first.value, first.expected)
        lines = "".join(f"\n  {e}" for e in self.errors)
        self.args = (f"{len(self.errors)} configuration errors:{lines}",)

    def __str__(self) -> str:
        return str(self.args[0])


def all_errors(e: ConfigError) -> tuple[ConfigError, ...]:
    """Each error ``e`` stands for: its list for a ``ConfigErrors``, else ``e`` alone."""
    return e.errors if isinstance(e, ConfigErrors) else (e,)


def gather(errors: Iterable[ConfigError]) -> ConfigError | None:
    """The one error to raise for ``errors``: None for none, the error itself for one, a ``ConfigErrors`` for more."""
    found = [e for x in errors for e in all_errors(x)]
    if not found:
        return None
    return found[0] if len(found) == 1 else ConfigErrors(found)


def in_file(e: ConfigError, where: str) -> ConfigError:
    """``e`` with each of its errors saying where the key is set, e.g. ``(in the drop-in /data/edge/edge.toml)``."""
    errors = [ConfigError(x.key, x.value, f"{x.expected} ({where})") for x in all_errors(e)]
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


# -- declaring sections ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One key of a section, as declared: its name in the section, its default and its converter."""

    key: str
    default: Any
    convert: Converter[Any]


_SETTINGS: dict[type[Any], tuple[Setting, ...]] = {}  # by section class: annotations are evaluated once


def settings(section: type[Any]) -> tuple[Setting, ...]:
    """The keys of a section dataclass, in declaration order.

    Raises:
        TypeError: a field's annotation is not ``Annotated[type, converter]`` or it has no default (a bug in the
            declaration, not in the file).
    """
    if section in _SETTINGS:
        return _SETTINGS[section]
    hints = typing.get_type_hints(section, include_extras=True)
    out = []
    for f in dataclasses.fields(section):
        hint = hints[f.name]
        converters = [m for m in getattr(hint, "__metadata__", ()) if callable(m)]
        if typing.get_origin(hint) is not Annotated or len(converters) != 1:
            raise TypeError(f"{section.__name__}.{f.name} is not annotated Annotated[type, converter]")
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{section.__name__}.{f.name} has no default")
        out.append(Setting(f.name, default, converters[0]))
    _SETTINGS[section] = tuple(out)
    return _SETTINGS[section]


def section_types(document: type[Any]) -> dict[str, type[Any]]:
    """The sections of a document dataclass: each field's name and its section dataclass."""
    hints = typing.get_type_hints(document)
    return {f.name: hints[f.name] for f in dataclasses.fields(document)}


# -- parsing ----------------------------------------------------------------------------------------------------------


def _dotted(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _table(name: str, table: object) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(name, table, "a table")
    return table


def _unknown(name: str, table: Mapping[str, Any], known: list[str]) -> list[ConfigError]:
    """An error for each key of ``table`` not in ``known``, with the nearest known key, sorted."""
    unknown = sorted(set(table) - set(known))
    if not unknown:
        return []
    import difflib  # noqa: PLC0415 -- only for a file with a mistake, never on a start that succeeds

    out = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {_dotted(name, close[0])!r}?" if close else "check the spelling"
        # The value of a misspelt key may be a secret (a misspelt repository URL): shown masked.
        out.append(ConfigError(_dotted(name, key), shown(table[key]), f"no such key ({hint})"))
    return out


def _raise(errors: Iterable[ConfigError]) -> None:
    if (e := gather(errors)) is not None:
        raise e


def _convert(cls: type[D], name: str, table: Mapping[str, Any], errors: list[ConfigError]) -> D:
    """The section ``cls`` from ``table``; each bad value's error is appended to ``errors`` and its key defaulted."""
    values = {}
    for s in settings(cls):
        if s.key in table:
            try:
                values[s.key] = s.convert(_dotted(name, s.key), table[s.key])
            except ConfigError as e:
                errors.extend(all_errors(e))
    return cls(**values)


def parse_section(cls: type[D], name: str, table: object) -> D:
    """Validate one TOML table into the section dataclass ``cls``.

    Args:
        cls: the section, its fields declared with ``setting``.
        name: the section's name, the prefix of its dotted keys (``""``: the top level).
        table: the table as ``tomllib`` returns it.

    Returns:
        The frozen section, defaults filled in.

    Raises:
        ConfigError: ``table`` is not a table; keys are unknown or values invalid (all of them, in one
            ``ConfigErrors`` when there are several).
    """
    t = _table(name, table)
    _raise(_unknown(name, t, [s.key for s in settings(cls)]))
    errors: list[ConfigError] = []
    section = _convert(cls, name, t, errors)
    _raise(errors)
    return section


def parse_document(cls: type[D], data: Mapping[str, Any]) -> D:
    """Validate a parsed TOML document into ``cls``, a dataclass whose fields are sections (``section_types``).

    Every error of the document is reported at once: the unknown keys of the top level and of each section (each
    with the nearest known key), then every section that is not a table and every invalid value.

    Args:
        cls: the document.
        data: the document as ``tomllib`` returns it.

    Returns:
        The frozen document; a missing section is all defaults.

    Raises:
        ConfigError: a section is not a table, keys are unknown, or a value is invalid; each message names the key.
            Several errors are one ``ConfigErrors``.
    """
    sections = section_types(cls)
    errors = _unknown("", data, list(sections))
    tables: dict[str, Mapping[str, Any]] = {}
    for name, section in sections.items():
        try:
            tables[name] = _table(name, data.get(name, {}))
        except ConfigError as e:
            errors.append(e)
            tables[name] = {}
            continue
        errors += _unknown(name, tables[name], [s.key for s in settings(section)])
    # Unknown keys (appended first) come before bad values: a misspelt key often explains a value left at default.
    document = cls(**{name: _convert(section, name, tables[name], errors) for name, section in sections.items()})
    _raise(errors)
    return document


def read_toml(path: Path, *, max_bytes: int = MAX_TOML_BYTES) -> dict[str, Any]:
    """Read a TOML file, at most ``max_bytes`` of it.

    Args:
        path: the file.
        max_bytes: the largest file accepted.

    Returns:
        The document as ``tomllib`` returns it.

    Raises:
        ConfigError: key ``"<file>"``, the path as value: the file is missing, unreadable, too large, not UTF-8 or
            not valid TOML (the message gives the line and column).
    """
    raw = _read_raw(path, max_bytes)
    if raw is None:
        raise ConfigError("<file>", str(path), "an existing configuration file")
    return _parse_toml(path, raw)


def read_optional_toml(path: Path, *, max_bytes: int = MAX_TOML_BYTES) -> dict[str, Any] | None:
    """Read a TOML file that may be absent: ``read_toml``, except that a missing file (or directory) is None.

    Only a missing file is None: one that exists but cannot be read or parsed is an error, never skipped.

    Raises:
        ConfigError: as ``read_toml``, except for a missing file.
    """
    raw = _read_raw(path, max_bytes)
    return None if raw is None else _parse_toml(path, raw)


def _read_raw(path: Path, max_bytes: int) -> bytes | None:
    """The file's bytes, None if it does not exist; at most ``max_bytes`` are accepted."""
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError("<file>", str(path), f"a readable UTF-8 file ({e})") from e
    if len(raw) > max_bytes:
        raise ConfigError("<file>", str(path), f"a configuration file of at most {max_bytes} bytes")
    return raw


def _parse_toml(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", str(path), f"a readable UTF-8 file ({e})") from e
    except tomllib.TOMLDecodeError as e:
        # Python 3.11's error has no lineno attribute; its message ends "(at line N, column M)".
        msg = str(e)
        m = re.search(r"\s*\(at (line \d+, column \d+)\)$", msg)
        where = f"{m.group(1)}: {msg[: m.start()]}" if m else msg
        raise ConfigError("<file>", str(path), f"valid TOML ({where})") from e


# -- writing ----------------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# TOML's short escapes; every other control character (U+0000..U+001F, U+007F) is written as \uXXXX, since a basic
# string may not hold it raw.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str) -> str:
    """``s`` as a TOML basic string."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            # A lone surrogate is no Unicode scalar value: neither UTF-8 nor a TOML escape can hold it.
            raise ValueError(f"cannot write {s!r} as TOML: it holds a lone surrogate")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # repr is the shortest text that reads back as the same float; TOML spells the specials inf, -inf, nan.
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list | tuple) and not any(isinstance(x, list | tuple | Mapping) for x in v):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping) and not any(isinstance(x, list | tuple | Mapping) for x in v.values()):
        # An inline table, as the gateway's ledger.ceilings is written: {digits = 120.0, "detector@2.0.0" = 15.0}
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r:.80} as a TOML configuration value")


def dump_toml(document: Mapping[str, Mapping[str, Any]]) -> str:
    """A document of tables (``[section]`` with ``key = value`` lines) as TOML text.

    Values are what configuration files hold: strings, integers, floats, booleans, and flat lists and inline tables
    of them.
    ``tomllib.loads(dump_toml(d)) == d`` for every such document.

    Raises:
        TypeError: a value of another type, or a section that is not a table (a bug in the caller).
        ValueError: a string holds a lone surrogate (it has no UTF-8 encoding).
    """
    lines: list[str] = []
    for name, table in document.items():
        if not isinstance(table, Mapping):
            raise TypeError(f"section {name!r} is not a table: {table!r:.80}")
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(name)}]")
        lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n" if lines else ""


# -- converters -------------------------------------------------------------------------------------------------------


def number_text(x: float) -> str:
    """A bound as the docs write it: ``64``, ``0.001``, ``2592000`` (no ``.0``, no exponent)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def shown(v: Any) -> Any:
    """A value fit for an error message: credentials masked (``edge.log.redact``), also those of a scheme-less
    ``user:password@host``, which redact() cannot tell from an e-mail address."""
    if not isinstance(v, str):
        return v
    if "://" not in v and "@" in v:
        v = f"{REDACTED}@{v.rpartition('@')[2]}"
    return redact(v)


def string(key: str, v: Any) -> str:
    """A non-empty string."""
    if not isinstance(v, str) or not v:
        raise ConfigError(key, v, "a non-empty string")
    return v


def boolean(key: str, v: Any) -> bool:
    """``true`` or ``false``."""
    if not isinstance(v, bool):
        raise ConfigError(key, v, "true or false")
    return v


def float_at_least(low: float) -> Converter[float]:
    """A finite number >= ``low``, as a float."""

    def convert(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < low:
            raise ConfigError(key, v, f"a finite number >= {low}")
        return float(v)

    return convert


def int_between(low: int, high: int) -> Converter[int]:
    """An integer in ``low..high``, both ends included."""

    def convert(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ConfigError(key, v, f"an integer >= {number_text(low)} and <= {number_text(high)}")
        return v

    return convert


def float_between(low: float, high: float) -> Converter[float]:
    """A finite number in ``low..high``, both ends included, as a float."""

    def convert(key: str, v: Any) -> float:
        ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and low <= v <= high
        if not ok:
            raise ConfigError(key, v, f"a finite number >= {number_text(low)} and <= {number_text(high)}")
        return float(v)

    return convert


def one_of(options: tuple[str, ...]) -> Converter[str]:
    """One of the strings ``options``."""

    def convert(key: str, v: Any) -> str:
        if v not in options:
            raise ConfigError(key, v, "one of " + ", ".join(repr(o) for o in options))
        return str(v)

    return convert


TCP_PORTS = (1, 65535)


def tcp_port(key: str, v: Any) -> int:
    """A TCP port number."""
    low, high = TCP_PORTS
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ConfigError(key, v, f"a TCP port number {low}..{high}")
    return v


def host_name(key: str, v: Any) -> str:
    """A host name or IP address: a URL or ``user:password@host`` would reach logs and errors verbatim."""
    if not isinstance(v, str) or not v or any(c in v for c in "/@?# \t"):
        raise ConfigError(key, shown(v), "a host name or IP address (not a URL)")
    return v


def fs_path(key: str, v: Any) -> Path:
    """A path, written as a non-empty string."""
    return Path(string(key, v))


def path_or_disabled(key: str, v: Any) -> Path | None:
    """A path, or ``""`` (TOML has no null) for None: the feature off."""
    if v == "":
        return None
    return fs_path(key, v)
