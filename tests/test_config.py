"""Configuration: defaults, validation errors that name the key, path resolution, the docs against the declarations."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import pytest

from edge.config import (
    LIVE_SETTINGS,
    MAX_BATCH_RECORDS,
    MAX_MODEL_MB,
    MAX_TOP_K,
    RANGES,
    Config,
    load_config,
    parse_config,
)
from edge.errors import ConfigError
from edge.inference.model import MAX_MODEL_BYTES
from edge.sensing.frames import PixelFormat
from edge.toml_config import (
    ConfigErrors,
    Setting,
    int_between,
    number_text,
    parse_section,
    read_toml,
    section_types,
    settings,
)
from edge.wire import schema
from edge.wire._bounds import MAX_RECORDS_PER_ENVELOPE

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_empty_document_gives_defaults() -> None:
    cfg = parse_config({})
    assert cfg == Config()
    assert cfg.model.threads == 1 and cfg.model.spinning is False
    assert cfg.source.kind == "synthetic" and cfg.source.pixel_format is PixelFormat.YUYV


def test_full_document_parsed(write_config) -> None:
    path = write_config(
        """
[device]
id = "box-7"
data_dir = "/tmp/edge-data"
[model]
path = "models/m.onnx"
threads = 2
spinning = true
warmup = 0
top_k = 5
[source]
kind = "npz"
path = "frames.npz"
pixel_format = "NV12"
loop = true
fps = 15.5
[preprocess]
crop = [4, 8, 64, 48]
letterbox = 114
mean = [1, 2, 3]
std = 255
[pipeline]
queue_size = 2
on_full = "drop_oldest"
[sink]
kind = "telemetry"
[telemetry]
host = "broker.fleet"
port = 18883
batch_records = 50
batch_age_s = 0.25
outbox_max_mb = 8
window = 64
[log]
level = "debug"
format = "text"
"""
    )
    cfg = load_config(path)
    assert cfg.device.id == "box-7"
    assert cfg.model.path == path.parent / "models/m.onnx"  # relative paths follow the config file
    assert cfg.source.path == path.parent / "frames.npz"
    assert cfg.model.threads == 2 and cfg.model.spinning and cfg.model.top_k == 5
    assert cfg.source.pixel_format is PixelFormat.NV12 and cfg.source.loop and cfg.source.fps == 15.5
    assert cfg.preprocess.crop == (4, 8, 64, 48) and cfg.preprocess.letterbox == 114.0
    assert cfg.preprocess.mean == (1.0, 2.0, 3.0) and cfg.preprocess.std == (255.0,)
    assert cfg.pipeline.on_full == "drop_oldest" and cfg.pipeline.queue_size == 2
    assert cfg.log.level == "debug" and cfg.log.format == "text"
    assert cfg.sink.kind == "telemetry"
    t = cfg.telemetry
    assert (t.host, t.port, t.batch_records, t.batch_age_s, t.outbox_max_mb, t.window) == (
        "broker.fleet",
        18883,
        50,
        0.25,
        8.0,
        64,
    )


@pytest.mark.parametrize(
    ("doc", "key", "expected"),
    [
        ({"model": {"threads": 0}}, "model.threads", "an integer >= 1"),
        ({"model": {"threads": "2"}}, "model.threads", "an integer >= 1"),
        ({"model": {"threads": True}}, "model.threads", "an integer >= 1"),
        ({"model": {"spinning": "no"}}, "model.spinning", "true or false"),
        ({"model": {"thread": 1}}, "model.thread", "no such key"),
        ({"modle": {}}, "modle", "no such key"),
        ({"source": {"kind": "camera"}}, "source.kind", "one of"),
        ({"source": {"pixel_format": "RGB"}}, "source.pixel_format", "one of RGB888"),
        ({"source": {"kind": "npz"}}, "source.path", "a path"),
        ({"source": {"kind": "serial"}}, "source.port", "serial device path"),
        ({"source": {"fps": -1}}, "source.fps", ">= 0"),
        ({"source": {"fps": float("nan")}}, "source.fps", "finite"),
        ({"preprocess": {"crop": [0, 0, 0, 5]}}, "preprocess.crop", "[x, y, width, height]"),
        ({"preprocess": {"crop": [0, 0, 5]}}, "preprocess.crop", "[x, y, width, height]"),
        ({"preprocess": {"std": [1, 0, 1]}}, "preprocess.std", ">= 0.001"),
        ({"preprocess": {"mean": [1, 2]}}, "preprocess.mean", "1 or 3"),
        ({"pipeline": {"on_full": "drop"}}, "pipeline.on_full", "one of"),
        ({"log": {"level": "loud"}}, "log.level", "one of"),
        ({"model": 3}, "model", "a table"),
        ({"telemetry": {"port": 70000}}, "telemetry.port", "TCP port"),
        ({"telemetry": {"batch_records": 0}}, "telemetry.batch_records", ">= 1"),
        ({"telemetry": {"hots": "x"}}, "telemetry.hots", "no such key"),
        ({"sink": {"kind": "mqtt"}}, "sink.kind", "one of"),
    ],
)
def test_invalid_value_names_key_value_and_expectation(doc, key, expected) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert info.value.key == key
    assert expected in str(info.value)
    assert key in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing configuration file"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_is_a_config_error(write_config) -> None:
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(write_config("[model\nthreads = 1"))


def test_config_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_config({"model": {"top_k": 0}})


def test_shipped_example_config_is_valid_and_equals_the_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "edge.example.toml"
    assert load_config(example) == Config()


# -- ranges of the numeric keys ------------------------------------------------------------------------------------

_LISTS = ("preprocess.crop", "preprocess.mean", "preprocess.std")


def _doc(key: str, value: Any) -> dict[str, Any]:
    section, name = key.split(".")
    return {section: {name: value}}


def _is_int(key: str) -> bool:
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    return isinstance(default, int) and not isinstance(default, bool)


def _absurd(key: str) -> list[Any]:
    low, high = RANGES[key]
    if key == "preprocess.crop":
        return [[0, 0, 1, int(high) + 1], [int(high) + 1, 0, 1, 1], [0, 0, 10**12, 10**12]]
    if key in ("preprocess.mean", "preprocess.std"):
        return [high * 10, [low - 1, low, low], [1e308] * 3, low - 1]
    if _is_int(key):
        return [int(high) + 1, int(low) - 1, 10**30, -(10**30)]
    values = [high * 2 + 1, low - 1, 1e300, -1e300, math.inf]
    if low > 0 and key != "source.fps":
        values.append(low / 2)
    return values


_CASES = [(key, value) for key in RANGES for value in _absurd(key)]


@pytest.mark.parametrize(("key", "value"), _CASES, ids=[f"{k}={v!r:.20}" for k, v in _CASES])
def test_absurd_numeric_values_are_refused_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(key, value))
    assert info.value.key == key
    assert key in str(info.value)
    _, high = RANGES[key]
    assert number_text(high) in str(info.value)  # the message states the range


@pytest.mark.parametrize("key", list(RANGES))
def test_both_ends_of_each_range_are_accepted(key: str) -> None:
    low, high = RANGES[key]
    section, name = key.split(".")
    for end in (low, high):
        if key == "preprocess.crop":
            value: Any = [int(end), int(end), max(int(end), 1), max(int(end), 1)]
            expected: Any = tuple(value)
        elif key in _LISTS:
            value, expected = [end, end, end], (float(end),) * 3
        else:
            value = expected = int(end) if _is_int(key) else end
        assert getattr(getattr(parse_config(_doc(key, value)), section), name) == expected


def test_fps_zero_means_unpaced_and_values_between_zero_and_the_minimum_are_refused() -> None:
    assert parse_config(_doc("source.fps", 0)).source.fps == 0.0
    low, _ = RANGES["source.fps"]
    with pytest.raises(ConfigError, match="0 \\(off\\) or a finite number"):
        parse_config(_doc("source.fps", low / 2))


def test_every_numeric_key_has_a_range() -> None:
    defaults = Config()
    numeric = {
        f"{section}.{f.name}"
        for section in Config.__dataclass_fields__
        for f in dataclasses.fields(getattr(defaults, section))
        if isinstance(getattr(getattr(defaults, section), f.name), int | float)
        and not isinstance(getattr(getattr(defaults, section), f.name), bool)
    }
    assert numeric | {"preprocess.crop", "preprocess.letterbox", "preprocess.mean", "preprocess.std"} == set(RANGES)


def test_ranges_agree_with_the_limits_they_come_from() -> None:
    assert MAX_TOP_K == schema._MAX_TOP_K
    assert MAX_BATCH_RECORDS == MAX_RECORDS_PER_ENVELOPE
    assert MAX_MODEL_MB * 2**20 <= MAX_MODEL_BYTES  # a model the box may download, it can also load


def test_live_settings_obey_the_same_ranges() -> None:
    with pytest.raises(ConfigError, match="<= 1000"):
        LIVE_SETTINGS["telemetry.batch_records"]("telemetry.batch_records", MAX_BATCH_RECORDS + 1)
    with pytest.raises(ConfigError, match="<= 3600"):
        LIVE_SETTINGS["telemetry.batch_age_s"]("telemetry.batch_age_s", 1e9)
    assert LIVE_SETTINGS["telemetry.batch_records"]("telemetry.batch_records", MAX_BATCH_RECORDS) == 1000


def test_the_docs_state_every_range() -> None:
    table = (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines()
    example = (DOCS / "edge.example.toml").read_text(encoding="utf-8").splitlines()
    section = ""
    example_lines: dict[str, str] = {}
    for line in example:
        if m := re.match(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"#?\s*(\w+)\s*=", line):
            example_lines.setdefault(f"{section}.{m.group(1)}", line)
    for key, (low, high) in RANGES.items():
        span = f"{number_text(low)}..{number_text(high)}"
        rows = [line for line in table if line.startswith(f"| `{key}` |")]
        assert len(rows) == 1 and f"`{span}`" in rows[0], (key, span, rows)
        assert span in example_lines.get(key, ""), (key, span, example_lines.get(key))


# -- no credentials in configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://admin:hunter2@models.example.net/fleet/?password=s3cret",
        "https://admin:hunter2@models.example.net/fleet/?password=s3cret",
        "https://admin:hunter2@models.example.net/fleet/#password=s3cret",
        "admin:hunter2@models.example.net/fleet/?password=s3cret",
    ],
)
def test_a_bad_repository_url_is_refused_without_its_credentials(url: str, write_config) -> None:
    path = write_config(f'[ota]\nrepository = "{url}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert info.value.key == "ota.repository" and "models.example.net" in text
    assert "hunter2" not in text and "s3cret" not in text and "hunter2" not in repr(info.value.value)


def test_a_good_repository_url_with_credentials_is_kept_for_the_client() -> None:
    cfg = parse_config({"ota": {"repository": "https://admin:hunter2@models.example.net/fleet"}})
    assert cfg.ota.repository == "https://admin:hunter2@models.example.net/fleet/"


@pytest.mark.parametrize(
    "host", ["mqtts://broker.fleet", "user:hunter2@broker.fleet", "mqtts://broker.fleet/?token=hunter2", "a b"]
)
def test_the_broker_host_is_a_host_not_a_url(host: str) -> None:
    with pytest.raises(ConfigError, match="host name or IP address") as info:
        parse_config({"telemetry": {"host": host}})
    assert info.value.key == "telemetry.host" and "hunter2" not in str(info.value)


# -- the declarations against the docs ------------------------------------------------------------------------------

SECTIONS = section_types(Config)


def _spec() -> dict[str, Setting]:
    """Every dotted key of the file and its declaration (default and converter)."""
    return {f"{name}.{s.key}": s for name, section in SECTIONS.items() for s in settings(section)}


def _example() -> tuple[dict[str, Any], set[str], set[str]]:
    """docs/edge.example.toml: its parsed keys (dotted), its commented-out keys and its section headers."""
    text = (DOCS / "edge.example.toml").read_text(encoding="utf-8")
    active = {f"{name}.{key}": v for name, table in tomllib.loads(text).items() for key, v in table.items()}
    commented: set[str] = set()
    headers: set[str] = set()
    section = ""
    for line in text.splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            section = m.group(1)
            headers.add(section)
        elif section and (m := re.match(r"#\s*(\w+)\s*=", line)):
            commented.add(f"{section}.{m.group(1)}")
    return active, commented, headers


def test_every_section_field_is_declared_with_its_converter() -> None:
    defaults = Config()
    for name, section in SECTIONS.items():
        assert [s.key for s in settings(section)] == [f.name for f in dataclasses.fields(section)], name
        for s in settings(section):
            assert s.default == getattr(getattr(defaults, name), s.key), (name, s.key)
            assert callable(s.convert)


def test_a_field_without_a_converter_is_a_declaration_bug() -> None:
    @dataclasses.dataclass(frozen=True)
    class Undeclared:
        ok: Annotated[int, int_between(0, 9)] = 1
        plain: int = 2

    with pytest.raises(TypeError, match=r"Undeclared\.plain"):
        settings(Undeclared)


def test_the_example_file_states_every_key_at_its_default() -> None:
    spec = _spec()
    active, commented, headers = _example()
    assert headers == set(SECTIONS), "docs/edge.example.toml has a [section] for each section, no other"
    assert not (active.keys() & commented), "a key is both set and commented out"
    assert active.keys() | commented == spec.keys(), {
        "undocumented": sorted(spec.keys() - active.keys() - commented),
        "not in the spec": sorted((active.keys() | commented) - spec.keys()),
    }
    for key, value in active.items():
        assert spec[key].convert(key, value) == spec[key].default, (key, value, spec[key].default)
    for key in commented:
        # Commented out only when the default cannot be written in the file (None, or a value the file refuses).
        default = spec[key].default
        try:
            written = default is not None and spec[key].convert(
                key, str(default) if isinstance(default, Path) else default
            )
        except ConfigError:
            written = False
        assert not written, f"{key} is commented out, but its default {default!r} can be written: write it"


def test_the_configuration_table_names_every_key() -> None:
    documented: set[str] = set()
    for line in (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        section = ""
        for written in re.findall(r"`([\w.]+)`", line.split("|")[1]):
            key = section + written if written.startswith(".") else written  # `telemetry.ca`, `.cert`, `.key`
            section = key.split(".")[0]
            documented.add(key)
    documented = {k for k in documented if "." in k}  # not the environment variables
    assert documented == _spec().keys(), {
        "undocumented": sorted(_spec().keys() - documented),
        "not in the spec": sorted(documented - _spec().keys()),
    }


# -- unknown keys: all at once, with the nearest known key ----------------------------------------------------------


def test_every_unknown_key_is_reported_at_once_with_a_suggestion() -> None:
    doc = {"telemtry": {}, "model": {"thread": 2, "wamrup": 1}, "log": {"zzz": 1}}
    with pytest.raises(ConfigErrors) as info:
        parse_config(doc)
    assert info.value.key == "telemtry"  # the top level first, then the sections in their order
    assert str(info.value).splitlines() == [
        "4 configuration errors:",
        "  config key 'telemtry': got {}, expected no such key (did you mean 'telemetry'?)",
        "  config key 'model.thread': got 2, expected no such key (did you mean 'model.threads'?)",
        "  config key 'model.wamrup': got 1, expected no such key (did you mean 'model.warmup'?)",
        "  config key 'log.zzz': got 1, expected no such key (check the spelling)",
    ]
    assert [e.key for e in info.value.errors] == ["telemtry", "model.thread", "model.wamrup", "log.zzz"]


def test_unknown_keys_are_reported_before_bad_values_and_every_bad_value_with_them() -> None:
    doc = {"model": {"threads": 0, "thread": 2}, "source": {"fps": -1}, "telemetry": {"reciept_key": ""}, "log": 1}
    with pytest.raises(ConfigErrors) as info:
        parse_config(doc)
    assert [e.key for e in info.value.errors] == [
        "model.thread",
        "telemetry.reciept_key",
        "log",
        "model.threads",
        "source.fps",
    ]
    assert info.value.key == "model.thread"  # a handler of one ConfigError sees the first
    lines = str(info.value).splitlines()
    assert lines[0] == "5 configuration errors:"
    assert lines[2] == (
        "  config key 'telemetry.reciept_key': got '', expected no such key (did you mean 'telemetry.receipt_key'?)"
    )
    assert lines[3] == "  config key 'log': got 1, expected a table"
    assert lines[4] == "  config key 'model.threads': got 0, expected an integer >= 1 and <= 64"


def test_a_single_error_is_raised_as_itself() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"threads": 0}})
    assert type(info.value) is ConfigError
    assert str(info.value) == "config key 'model.threads': got 0, expected an integer >= 1 and <= 64"


def test_one_section_reports_all_its_unknown_keys() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_section(SECTIONS["telemetry"], "telemetry", {"hots": "x", "prot": 1, "port": 1})
    assert info.value.key == "telemetry.hots"
    assert "'telemetry.hots': got 'x', expected no such key (did you mean 'telemetry.host'?)" in str(info.value)
    assert "'telemetry.prot': got 1, expected no such key (did you mean 'telemetry.port'?)" in str(info.value)


def test_an_unknown_keys_value_is_shown_without_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"ota": {"repositry": "https://admin:hunter2@models.example.net/fleet/"}})
    assert info.value.key == "ota.repositry" and "did you mean 'ota.repository'?" in str(info.value)
    assert "hunter2" not in str(info.value)


# -- reading the file -----------------------------------------------------------------------------------------------


def test_invalid_toml_names_the_file_and_the_line(write_config) -> None:
    path = write_config("[model]\nthreads = 1\n[source\n")
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert info.value.key == "<file>" and info.value.value == str(path)
    assert "valid TOML (line 3, column 8:" in str(info.value)


def test_an_oversized_file_is_refused_before_it_is_parsed(write_config) -> None:
    path = write_config("# padding\n" * 20)
    assert read_toml(path, max_bytes=200) == {}
    with pytest.raises(ConfigError, match="at most 100 bytes") as info:
        read_toml(path, max_bytes=100)
    assert info.value.value == str(path)
