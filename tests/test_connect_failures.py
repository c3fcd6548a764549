"""A box's connection failures, told apart and named: the classifier alone, then each cause against a real mosquitto.

Against the broker every test asserts the cause, the log level, that the message names the address and the file or
setting at fault and the fix, and which schedule the next attempt waits on: a permanent failure waits on the long
one (here 2 s doubling to 4 s, each wait at least half its ceiling, so at least 1 s), a network failure on the usual
one (at most 0.3 s here).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_broker import Broker, ClientCreds, TestPKI, free_port

from edge.errors import ConfigError
from edge.mqtt import Backoff, ConnectFailure, MqttSettings, MqttTransport
from edge.mqtt_failures import (
    TAKEOVER_LIMIT,
    ConnectContext,
    SettingNames,
    TakeoverWatch,
    certificate_facts,
    classify_connect_error,
)

SHORT_MAX = 0.3
LONG_MIN, LONG_MAX = 2.0, 4.0
LONG_FIRST_WAIT = LONG_MIN / 2  # the long schedule's floor is half its ceiling


# -- helpers ----------------------------------------------------------------------------------------------------


class Records(logging.Handler):
    """The records of edge.mqtt, whatever the logging tree's state (another test may have configured it)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def failures(self, cause: str) -> list[logging.LogRecord]:
        return [r for r in self.records if fields(r).get("cause") == cause]

    def delays_after(self, record: logging.LogRecord) -> list[dict[str, object]]:
        """The "reconnecting" events logged after ``record`` (by any transport)."""
        later = self.records[self.records.index(record) + 1 :]
        return [fields(r) for r in later if r.getMessage() == "reconnecting"]


def fields(record: logging.LogRecord) -> dict[str, object]:
    return dict(getattr(record, "edge_fields", {}))


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("edge.mqtt")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def settings(host: str, port: int, creds: ClientCreds, **kw: object) -> MqttSettings:
    base: dict[str, object] = {
        "host": host,
        "port": port,
        "ca": creds.ca,
        "cert": creds.cert,
        "key": creds.key,
        "client_id": creds.device_id,
        "backoff_min": 0.1,
        "backoff_max": SHORT_MAX,
        "permanent_backoff_min": LONG_MIN,
        "permanent_backoff_max": LONG_MAX,
        "connect_timeout": 5.0,
    }
    return MqttSettings(**{**base, **kw})  # type: ignore[arg-type]


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def first_failure(
    t: MqttTransport, records: Records, timeout: float = 10.0
) -> tuple[ConnectFailure, logging.LogRecord]:
    """Start ``t``, wait for its first failure and the "reconnecting" event after it; stop it."""
    t.start()
    try:
        assert wait_for(lambda: t.last_failure is not None, timeout), "no failure was named"
        failure = t.last_failure
        assert failure is not None
        record = records.failures(failure.cause)[0]
        assert wait_for(lambda: bool(records.delays_after(record)), timeout)
    finally:
        t.stop()
    assert not t.connected
    return failure, record


def assert_long_wait(records: Records, record: logging.LogRecord) -> None:
    nxt = records.delays_after(record)[0]
    assert nxt["schedule"] == "permanent"
    assert LONG_FIRST_WAIT <= float(nxt["delay_s"]) <= LONG_MIN  # type: ignore[arg-type]


def assert_short_wait(records: Records, record: logging.LogRecord) -> None:
    nxt = records.delays_after(record)[0]
    assert nxt["schedule"] == "transient"
    assert float(nxt["delay_s"]) <= SHORT_MAX  # type: ignore[arg-type]


# -- the classifier on real TLS failures, without a broker ----------------------------------------------------------


def tls_failure(client: ssl.SSLContext, server: ssl.SSLContext, server_hostname: str = "localhost") -> ssl.SSLError:
    """Run a TLS handshake between two contexts in memory; return what the client side raises (a real exception,
    with OpenSSL's reason, as connect() or paho's first read would see it)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    server_done = False
    for _ in range(20):
        try:
            cli.do_handshake()
            cli.read(1)  # TLS 1.3: the server's verdict on our certificate comes after our handshake ended
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            return e
        s_in.write(c_out.read())
        if not server_done:
            try:
                srv.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                pass  # it refused us: its alert is in s_out, for the client to read
        c_in.write(s_out.read())
    raise AssertionError("the handshake neither failed nor stopped")


def client_ctx(creds: ClientCreds, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca or creds.ca))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return ctx


def server_ctx(pki: TestPKI, *, crl: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(pki.ca))
    if crl:
        ctx.load_verify_locations(str(pki.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def context_for(creds: ClientCreds, *, client_id: str | None = None, port: int = 8883) -> ConnectContext:
    cn, not_after = certificate_facts(creds.cert.read_bytes())
    return ConnectContext(
        "127.0.0.1", port, str(creds.ca), str(creds.cert), client_id or creds.device_id, cn, not_after
    )


NOW = time.time()


def test_classifier_names_a_foreign_ca_with_the_ca_file(pki: TestPKI, tmp_path: Path) -> None:
    other = TestPKI(tmp_path / "other")
    creds = pki.client("dev-a")
    e = tls_failure(client_ctx(creds, ca=other.ca), server_ctx(pki))
    assert isinstance(e, ssl.SSLCertVerificationError)
    f = classify_connect_error(e, None, context=dataclasses.replace(context_for(creds), ca=str(other.ca)), now=NOW)
    assert (f.cause, f.permanent, f.level) == ("wrong_ca", True, logging.ERROR)
    assert str(other.ca) in f.detail and "telemetry.ca" in f.detail and "127.0.0.1:8883" in f.detail
    assert "re-enroll" in f.fix and "telemetry.host" in f.fix
    assert f.at == NOW and f.message == f"wrong_ca: {f.detail}; fix: {f.fix}"


def test_classifier_names_a_broker_certificate_for_another_host_with_the_host_setting(pki: TestPKI) -> None:
    creds = pki.client("dev-a")
    e = tls_failure(client_ctx(creds), server_ctx(pki), server_hostname="broker.example.net")
    f = classify_connect_error(
        e, None, context=dataclasses.replace(context_for(creds), host="broker.example.net"), now=NOW
    )
    assert f.cause == "wrong_ca" and "does not name 'broker.example.net'" in f.detail
    assert "set telemetry.host" in f.fix


def test_classifier_names_the_expired_alert(pki: TestPKI) -> None:
    creds = pki.expired_client("dev-old")
    e = tls_failure(client_ctx(creds), server_ctx(pki))
    assert e.reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    f = classify_connect_error(e, None, context=context_for(creds), now=NOW)
    assert (f.cause, f.permanent) == ("certificate_expired", True)
    assert str(creds.cert) in f.detail and "telemetry.cert" in f.detail and "alert" in f.detail
    assert "edge enroll --renew" in f.fix and "edge enroll --claim" in f.fix


def test_classifier_names_the_revoked_alert(pki: TestPKI) -> None:
    creds = pki.client("dev-revoked-unit")
    pki.revoke(creds)
    e = tls_failure(client_ctx(creds), server_ctx(pki, crl=True))
    assert e.reason == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    f = classify_connect_error(e, None, context=context_for(creds), now=NOW)
    assert (f.cause, f.permanent) == ("certificate_revoked", True)
    assert str(creds.cert) in f.detail and "revoked" in f.fix and "edge enroll --claim" in f.fix


@pytest.mark.parametrize(
    ("ca_name", "alert"),
    [("another-fleet-ca", "TLSV1_ALERT_UNKNOWN_CA"), ("test-fleet-ca", "TLSV1_ALERT_DECRYPT_ERROR")],
)
def test_classifier_names_our_certificate_from_another_fleet(
    pki: TestPKI, tmp_path: Path, ca_name: str, alert: str
) -> None:
    # Another fleet's CA: the broker has no CA of that name, or one of that name with another key.
    stranger = TestPKI(tmp_path / "other", ca_name=ca_name).client("dev-s")
    e = tls_failure(client_ctx(dataclasses.replace(stranger, ca=pki.ca)), server_ctx(pki))
    assert e.reason == alert
    f = classify_connect_error(e, None, context=context_for(stranger), now=NOW)
    assert f.cause == "wrong_ca" and "does not know the CA of our certificate" in f.detail


def test_classifier_reads_the_alert_from_pahos_socket_error_text(pki: TestPKI) -> None:
    # What paho logs when the alert arrives after CONNECT went out (it returns only a code).
    text = "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked (x)"
    f = classify_connect_error(None, None, context=context_for(pki.client("dev-a")), now=NOW, socket_error=text)
    assert f.cause == "certificate_revoked"


def test_classifier_detects_our_expired_certificate_locally_when_the_broker_only_closed(pki: TestPKI) -> None:
    creds = pki.expired_client("dev-old")
    ctx = context_for(creds)
    assert ctx.cert_not_after is not None and ctx.cert_not_after < NOW
    eof = ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")
    for exc in (eof, None, ConnectionResetError(104, "Connection reset by peer")):
        f = classify_connect_error(exc, None, context=ctx, now=NOW)
        assert f.cause == "certificate_expired" and "ended the handshake" in f.detail, exc
    # The same close with a valid certificate is not blamed on it.
    f = classify_connect_error(eof, None, context=context_for(pki.client("dev-a")), now=NOW)
    assert (f.cause, f.permanent) == ("other", False) and "during the TLS handshake" in f.detail


def test_classifier_puts_a_network_failure_before_a_local_expiry(pki: TestPKI) -> None:
    ctx = context_for(pki.expired_client("dev-old"))
    f = classify_connect_error(ConnectionRefusedError(111, "Connection refused"), None, context=ctx, now=NOW)
    assert f.cause == "unreachable"


@pytest.mark.parametrize("reason", ["Not authorized", "Bad user name or password"])
def test_classifier_tells_a_client_id_mismatch_from_an_identity_not_granted(pki: TestPKI, reason: str) -> None:
    creds = pki.client("dev-a")
    f = classify_connect_error(None, reason, context=context_for(creds, client_id="box-7"), now=NOW)
    assert (f.cause, f.permanent) == ("client_id_mismatch", True)
    assert "'box-7' (device.id)" in f.detail and "'dev-a'" in f.detail and str(creds.cert) in f.detail
    assert "set device.id to 'dev-a'" in f.fix
    g = classify_connect_error(None, reason, context=context_for(creds), now=NOW)
    assert (g.cause, g.permanent) == ("not_authorized", True)
    assert "'dev-a'" in g.detail and "edge fleet devices" in g.fix


def test_classifier_escalates_takeovers_to_a_permanent_identity_in_use(pki: TestPKI) -> None:
    ctx = context_for(pki.client("dev-a"))
    once = classify_connect_error(None, None, context=ctx, now=NOW, disconnect_reason="Session taken over")
    assert (once.cause, once.permanent, once.level) == ("identity_in_use", False, logging.WARNING)
    again = classify_connect_error(None, None, context=ctx, now=NOW, takeovers=TAKEOVER_LIMIT)
    assert (again.cause, again.permanent, again.level) == ("identity_in_use", True, logging.ERROR)
    assert "another box uses this identity" in again.detail and "edge enroll --claim" in again.fix


def test_classifier_names_network_failures_unreachable_and_transient(pki: TestPKI) -> None:
    ctx = context_for(pki.client("dev-a"), port=1884)
    for exc, words in [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (TimeoutError("timed out"), "no answer"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "cannot resolve"),
        (OSError(113, "No route to host"), "No route to host"),
    ]:
        f = classify_connect_error(exc, None, context=ctx, now=NOW)
        assert (f.cause, f.permanent, f.level) == ("unreachable", False, logging.WARNING)
        assert words in f.detail and "127.0.0.1:1884" in f.detail and "telemetry.host" in f.detail + f.fix


def test_classifier_keeps_the_raw_reason_of_anything_else(pki: TestPKI) -> None:
    ctx = context_for(pki.client("dev-a"))
    f = classify_connect_error(None, "Server unavailable", context=ctx, now=NOW)
    assert (f.cause, f.permanent) == ("other", False) and "Server unavailable" in f.detail
    assert "before its CONNACK" in classify_connect_error(None, None, context=ctx, now=NOW).detail


def test_classifier_names_the_settings_it_is_given(pki: TestPKI) -> None:
    names = SettingNames(host="broker.host", port="broker.port", ca="broker.ca", cert="broker.cert", client_id="gw")
    ctx = dataclasses.replace(context_for(pki.client("dev-a")), names=names)
    f = classify_connect_error(ConnectionRefusedError(111, "refused"), None, context=ctx, now=NOW)
    assert "broker.host" in f.detail and "telemetry" not in f.message


def test_certificate_facts(pki: TestPKI) -> None:
    creds = pki.client("dev-a")
    cn, not_after = certificate_facts(creds.cert.read_bytes())
    assert cn == "dev-a" and not_after is not None and not_after > NOW
    assert certificate_facts(b"not a certificate") == (None, None)


def test_takeover_watch_counts_within_its_window() -> None:
    w = TakeoverWatch(window_s=60.0)
    assert [w.taken_over(t) for t in (0.0, 10.0, 50.0)] == [1, 2, 3]
    assert w.taken_over(111.0) == 1  # the others are more than a minute old
    w.reset()
    assert w.taken_over(112.0) == 1


def test_permanent_backoff_keeps_a_floor_and_spreads_above_it() -> None:
    b = Backoff(30.0, 600.0, random.Random(3), floor=0.5)
    assert [b.ceiling(n) for n in range(7)] == [30.0, 60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    for n in range(8):
        delays = [b.delay(n) for _ in range(200)]
        assert all(b.ceiling(n) / 2 <= d <= b.ceiling(n) for d in delays)
        assert max(delays) - min(delays) > 0.3 * b.ceiling(n)  # still jittered: the fleet is spread
    with pytest.raises(ValueError, match="floor"):
        Backoff(1.0, 2.0, floor=1.5)


def test_settings_reject_a_long_schedule_shorter_at_its_start_than_its_end(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="permanent_backoff_min"):
        MqttSettings("h", 8883, tmp_path, tmp_path, tmp_path, "dev-a", permanent_backoff_min=700.0)
    s = MqttSettings("h", 8883, tmp_path, tmp_path, tmp_path, "dev-a")
    assert (s.permanent_backoff_min, s.permanent_backoff_max) == (30.0, 600.0)


# -- each cause against a real mosquitto ----------------------------------------------------------------------------


def test_wrong_ca(broker: Broker, pki: TestPKI, records: Records, tmp_path: Path) -> None:
    other = TestPKI(tmp_path / "other")
    t = MqttTransport(settings(broker.host, broker.port, pki.client("dev-a"), ca=other.ca))
    f, record = first_failure(t, records)
    assert (f.cause, f.permanent) == ("wrong_ca", True)
    assert record.levelno == logging.ERROR and record.getMessage() == f.message
    msg = record.getMessage()
    assert f"{broker.host}:{broker.port}" in msg and str(other.ca) in msg and "telemetry.ca" in msg
    assert "the box's fleet CA does not match the broker's" in msg and "re-enroll" in msg and "telemetry.host" in msg
    assert t.failures["wrong_ca"] >= 1
    assert_long_wait(records, record)


def test_expired_certificate(broker: Broker, pki: TestPKI, records: Records) -> None:
    creds = pki.expired_client("dev-old")
    f, record = first_failure(MqttTransport(settings(broker.host, broker.port, creds)), records)
    assert (f.cause, f.permanent) == ("certificate_expired", True)
    msg = record.getMessage()
    assert record.levelno == logging.ERROR
    assert f"{broker.host}:{broker.port}" in msg and str(creds.cert) in msg and "telemetry.cert" in msg
    # The broker's alert was read (before CONNECT went out), not guessed from our own clock.
    assert "TLS alert certificate expired" in msg
    assert "edge enroll --renew" in msg and "edge enroll --claim" in msg
    assert_long_wait(records, record)


def test_revoked_certificate(pki: TestPKI, records: Records, tmp_path: Path) -> None:
    revoked = pki.client("dev-revoked")
    pki.revoke(revoked)
    broker = Broker(tmp_path / "broker", pki, crlfile=pki.crl)
    broker.start()
    try:
        f, record = first_failure(MqttTransport(settings(broker.host, broker.port, revoked)), records)
        # The CRL refuses only what it lists.
        ok = MqttTransport(settings(broker.host, broker.port, pki.client("dev-a")))
        ok.start()
        try:
            assert ok.wait_connected(5)
        finally:
            ok.stop()
    finally:
        broker.stop()
    assert (f.cause, f.permanent) == ("certificate_revoked", True)
    msg = record.getMessage()
    assert record.levelno == logging.ERROR
    assert f"{broker.host}:{broker.port}" in msg and str(revoked.cert) in msg and "telemetry.cert" in msg
    assert "revoked by the fleet" in msg and "edge enroll --claim" in msg
    assert_long_wait(records, record)


@pytest.fixture
def strict_broker(pki: TestPKI, tmp_path: Path) -> Iterator[Broker]:
    """A broker that refuses CONNECT by client id. mosquitto 2.0.11 binds no client id to a certificate identity
    (measured: our plain broker accepts dev-a's certificate with any client id; the fleet's broker replaces the id
    with the CN), and ``clientid_prefixes`` is its one option that refuses a CONNECT ("Not authorized") by client
    id: it stands in for a broker, or plugin, that does."""
    b = Broker(tmp_path / "strict", pki, extra="clientid_prefixes dev-\n")
    b.start()
    yield b
    b.stop()


def test_client_id_not_matching_the_certificate(strict_broker: Broker, pki: TestPKI, records: Records) -> None:
    creds = pki.client("dev-a")
    ok = MqttTransport(settings(strict_broker.host, strict_broker.port, creds))
    ok.start()
    try:
        assert ok.wait_connected(5), "the broker refuses everyone: the test would prove nothing"
    finally:
        ok.stop()
    t = MqttTransport(settings(strict_broker.host, strict_broker.port, creds, client_id="box-a"))
    f, record = first_failure(t, records)
    assert (f.cause, f.permanent) == ("client_id_mismatch", True)
    msg = record.getMessage()
    assert record.levelno == logging.ERROR and f"{strict_broker.host}:{strict_broker.port}" in msg
    assert "'box-a' (device.id)" in msg and "CN 'dev-a'" in msg and str(creds.cert) in msg
    assert "set device.id to 'dev-a'" in msg
    assert_long_wait(records, record)


def test_identity_not_granted(strict_broker: Broker, pki: TestPKI, records: Records) -> None:
    creds = pki.client("box-b")  # matching client id, refused by the broker's rule
    f, record = first_failure(MqttTransport(settings(strict_broker.host, strict_broker.port, creds)), records)
    assert (f.cause, f.permanent) == ("not_authorized", True)
    msg = record.getMessage()
    assert record.levelno == logging.ERROR and "'box-b'" in msg and str(creds.cert) in msg
    assert "edge fleet devices" in msg
    assert_long_wait(records, record)


def test_same_identity_connected_twice(broker: Broker, pki: TestPKI, records: Records) -> None:
    creds = pki.client("dev-twin")  # one key and certificate, copied onto two boxes
    boxes = [MqttTransport(settings(broker.host, broker.port, creds)) for _ in range(2)]
    for t in boxes:
        t.start()
    try:
        # Each takes the session from the other at every reconnect, until each names it and backs off, longer with
        # every further takeover.
        assert wait_for(lambda: all(t.failures["identity_in_use"] >= 3 for t in boxes), 60), [t.failures for t in boxes]
    finally:
        for t in boxes:
            t.stop()
    for t in boxes:
        f = t.last_failure
        assert f is not None and (f.cause, f.permanent) == ("identity_in_use", True)
        assert t.connects >= TAKEOVER_LIMIT
    errors = [r for r in records.failures("identity_in_use") if r.levelno == logging.ERROR]
    assert len(errors) >= 2
    msg = errors[0].getMessage()
    assert f"{broker.host}:{broker.port}" in msg and "'dev-twin'" in msg and str(creds.cert) in msg
    assert "another box uses this identity" in msg and "give each box its own identity" in msg
    # The takeover schedule: a second at first (a broker restarted a few times looks the same on mosquitto 2.0),
    # then doubling while the fight goes on.
    waits = [float(d["delay_s"]) for d in records.delays_after(errors[0]) if d["schedule"] == "takeover"]  # type: ignore[arg-type]
    assert waits and min(waits) <= 1.0 and max(waits) >= 2.0, waits


def test_broker_unreachable(pki: TestPKI, records: Records) -> None:
    port = free_port()  # nothing listens there
    f, record = first_failure(MqttTransport(settings("127.0.0.1", port, pki.client("dev-a"))), records)
    assert (f.cause, f.permanent) == ("unreachable", False)
    msg = record.getMessage()
    assert record.levelno == logging.WARNING and f"127.0.0.1:{port}" in msg and "connection refused" in msg
    assert "telemetry.host" in msg and "usual backoff" in msg
    assert_short_wait(records, record)


def test_a_fixed_ca_file_is_used_at_the_next_attempt_and_resets_the_long_schedule(
    broker: Broker, pki: TestPKI, records: Records, tmp_path: Path
) -> None:
    creds = pki.client("dev-a")
    ca = tmp_path / "fleet-ca.pem"
    ca.write_bytes(TestPKI(tmp_path / "other").ca.read_bytes())
    t = MqttTransport(settings(broker.host, broker.port, creds, ca=ca))
    t.start()
    try:
        assert wait_for(lambda: t.failures["wrong_ca"] >= 1)
        ca.write_bytes(pki.ca.read_bytes())  # the operator copies the right CA; no restart
        assert t.wait_connected(LONG_MAX + 5)
        last = t.last_failure
        assert last is not None and last.cause == "wrong_ca"  # kept for the status: what failed last, and when
        broker.stop()
        assert wait_for(lambda: t.failures["unreachable"] >= 1)
        lost = [r for r in records.records if r.getMessage() == "disconnected"][-1]
        # The session's end: one attempt at once (is the broker still there?), then the usual schedule again.
        assert [d["schedule"] for d in records.delays_after(lost)[:2]] == ["immediate", "transient"]
    finally:
        t.stop()


@pytest.mark.parametrize("kill", [False, True])
def test_broker_restarts_are_not_taken_for_a_takeover(
    broker: Broker, pki: TestPKI, records: Records, kill: bool
) -> None:
    # A broker that dies closes the session as silently as one that hands it to another connection. With a
    # reconnect delay the restart fits into (up to 1 s here), only the attempt made at once tells them apart.
    t = MqttTransport(settings(broker.host, broker.port, pki.client("dev-a"), backoff_min=1.0, backoff_max=1.0))
    t.start()
    try:
        for _ in range(TAKEOVER_LIMIT + 1):
            assert t.wait_connected(10)
            connects = t.connects
            broker.restart(kill=kill)
            assert wait_for(lambda n=connects: t.connects > n, 10), "not reconnected after the restart"
    finally:
        t.stop()
    assert t.failures["identity_in_use"] == 0, t.last_failure
    assert not [r for r in records.records if r.levelno >= logging.ERROR]


def test_repeated_permanent_failures_are_counted_but_logged_at_error_only_the_first_times(
    broker: Broker, pki: TestPKI, records: Records, tmp_path: Path
) -> None:
    other = TestPKI(tmp_path / "other")
    s = settings(
        broker.host,
        broker.port,
        pki.client("dev-a"),
        ca=other.ca,
        permanent_backoff_min=0.02,
        permanent_backoff_max=0.05,
    )
    t = MqttTransport(s)
    t.start()
    try:
        assert wait_for(lambda: t.failures["wrong_ca"] >= 8)
    finally:
        t.stop()
    logged = records.failures("wrong_ca")
    assert [r.levelno for r in logged[:4]] == [logging.ERROR] * 3 + [logging.DEBUG]
    assert sum(r.levelno == logging.ERROR for r in logged) == 3
    assert len(logged) == t.failures["wrong_ca"]  # none goes uncounted


def test_expiry_is_checked_against_the_wall_clock_of_the_box(pki: TestPKI) -> None:
    # notAfter is compared with ``now`` as given: a box whose clock is a day behind does not call it expired.
    ctx = context_for(pki.expired_client("dev-old"))
    assert ctx.cert_not_after is not None
    behind = ctx.cert_not_after - datetime.timedelta(days=1).total_seconds()
    eof = ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF")
    assert classify_connect_error(eof, None, context=ctx, now=behind).cause == "other"
