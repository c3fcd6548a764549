"""edge.log: structured lines in both formats, and no credential in any of them (message, fields at any depth,
tracebacks, and the warnings of the libraries the box's updates use)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from edge.log import REDACTED, configure, event, redact

SECRETS = ("hunter2", "s3cret", "tok3n", "MIIEvQIBADANBg")
URL = "https://admin:hunter2@models.example.net/fleet/metadata/timestamp.json?sslmode=require&password=s3cret"


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """configure() changes process-wide loggers: put them back for the next test."""
    names = ("edge", "urllib3", "tuf")
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names
    }
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            URL,
            f"https://admin:{REDACTED}@models.example.net/fleet/metadata/timestamp.json?sslmode=require&password={REDACTED}",
        ),
        ("cannot reach https://tok3n@host/x: refused", f"cannot reach https://{REDACTED}@host/x: refused"),
        ("http://u:p@ss:w0rd@host/", f"http://u:{REDACTED}@host/"),
        ("mqtts://dev:hunter2@broker:8883", f"mqtts://dev:{REDACTED}@broker:8883"),
        (
            "s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=def&ok=1",
            f"s3://b/k?X-Amz-Signature={REDACTED}&X-Amz-Credential={REDACTED}&ok=1",
        ),
        ("host=db password=hunter2 user=me", f"host=db password={REDACTED} user=me"),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----",
            f"-----BEGIN PRIVATE KEY----- {REDACTED} -----END PRIVATE KEY-----",
        ),
        ("set key=telemetry.batch_records value=7", "set key=telemetry.batch_records value=7"),
        (
            "mail ops@example.net about https://models.example.net/",
            "mail ops@example.net about https://models.example.net/",
        ),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_credential_reaches_a_log_line(fmt: str, restore_loggers: None) -> None:
    out = io.StringIO()
    configure("debug", fmt, stream=out)
    log = logging.getLogger("edge.test")
    event(
        log,
        logging.WARNING,
        f"cannot reach {URL}",
        url=URL,
        password="hunter2",
        nested={"repository": URL, "db_password": "hunter2", "list": [URL, ("x", URL)]},
        error=ValueError(URL),
    )
    log.error("retrying %s", URL)
    try:
        raise ConnectionError(f"refused: {URL}\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----")
    except ConnectionError:
        log.exception("download failed")
    # urllib3 logs its retries with the request path and query: through the same handler, redacted.
    logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken: %s", "/x?token=tok3n")
    text = out.getvalue()
    assert text.count("models.example.net") >= 6 and "Retrying" in text and "download failed" in text
    for secret in SECRETS:
        assert secret not in text, (secret, text)
    if fmt == "json":
        first = json.loads(text.splitlines()[0])
        assert first["password"] == REDACTED and first["nested"]["db_password"] == REDACTED
        assert first["nested"]["list"][1] == ["x", redact(URL)]


def test_library_loggers_only_pass_warnings(restore_loggers: None) -> None:
    out = io.StringIO()
    configure("debug", "json", stream=out)
    logging.getLogger("urllib3").debug("Starting new HTTPS connection (1): host:443")
    logging.getLogger("tuf.ngclient").info("Downloading: %s", URL)
    assert out.getvalue() == ""


# -- the one log throttle -------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throttle_logs_first_then_once_per_interval_with_the_suppressed_count() -> None:
    from edge.log import Throttle  # noqa: PLC0415

    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    assert throttle.allow("box-1", "fork") == 0
    assert [throttle.allow("box-1", "fork") for _ in range(5)] == [None] * 5
    assert throttle.allow("box-2", "fork") == 0  # keys are counted apart
    clock.t += 10.0
    assert throttle.allow("box-1", "fork") == 5
    assert throttle.allow("box-1", "fork") is None


def test_throttle_first_n_in_full_and_batches_of_occurrences() -> None:
    from edge.log import Throttle  # noqa: PLC0415

    clock = FakeClock()
    throttle = Throttle(1.0, first=3, clock=clock)
    assert [throttle.allow("cobs") for _ in range(4)] == [0, 0, 0, None]
    assert throttle.allow("cobs", n=7) is None
    clock.t += 1.0
    assert throttle.allow("cobs", n=2) == 9  # 8 suppressed before, and the first of these two is the one logged


def test_throttle_memory_is_bounded_whatever_the_keys() -> None:
    from edge.log import Throttle  # noqa: PLC0415

    throttle = Throttle(60.0, clock=FakeClock(), max_keys=100)
    for i in range(1000):
        assert throttle.allow(f"attacker-{i}") == 0
    assert len(throttle._seen) <= 100
