"""Configuration: defaults, validation errors that name the key, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import Config, load_config, parse_config
from edge.errors import ConfigError
from edge.sensing.frames import PixelFormat


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
        ({"preprocess": {"std": [1, 0, 1]}}, "preprocess.std", "nonzero"),
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
