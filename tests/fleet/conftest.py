"""Fixtures for the gateway store: both backends behind one ``backend`` parameter, and simulated devices.

Every store test runs against SQLite (a file in the test's directory) and PostgreSQL (a fresh database per test
on the server ``pg.py`` finds or starts). Devices are real: Ed25519 keys, certificates from the test fleet CA,
envelopes sealed by ``seal_envelope``.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pg import PrivateServer, fresh_database, running_server_url

from edge.fleet.store import DeviceRecord, Inbound, Store, open_store
from edge.identity.did import did_key_from_public
from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope
from edge.wire.records import InferenceRecord, ReadingRecord
from edge.wire.schema import EventRecord, LossNotice, TelemetryRecord

# 2023-11-14 22:13:20 UTC; the next UTC day starts at MIDNIGHT.
T0 = 1_700_000_000.0
MIDNIGHT = 1_700_006_400.0
DAY0, DAY1 = "2023-11-14", "2023-11-15"


class SimDevice:
    """A device as the firmware runs it: a key, a counter, the hash of its last envelope, a fleet certificate."""

    def __init__(self, device_id: str, cert_pem: str = "") -> None:
        self.id = device_id
        self.key = Ed25519PrivateKey.generate()
        self.cert_pem = cert_pem
        self.counter = 0
        self.prev = GENESIS_PREV
        self.topic = f"devices/{device_id}/telemetry"

    @property
    def public_raw(self) -> bytes:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def did(self) -> str:
        return did_key_from_public(self.key.public_key())

    def record(self, enrolled_at: float = T0 - 3600) -> DeviceRecord:
        return DeviceRecord(self.id, self.did, self.public_raw, self.cert_pem, enrolled_at)

    def readings(self, n: int) -> list[TelemetryRecord]:
        return [ReadingRecord(channel=i, value=float(self.counter), timestamp=T0 + self.counter) for i in range(n)]

    def inferences(self, n: int, model: str = "digits@1.0.0") -> list[TelemetryRecord]:
        """``n`` inference records for the next envelope."""
        c = self.counter + 1
        return [
            InferenceRecord(
                seq=c * 1000 + i,
                timestamp=T0 + c,
                model_id=model,
                model_sha256="11" * 32,
                # A frame's SHA-256, as a box computes it: distinct frames, uniformly spread hashes.
                input_sha256=hashlib.sha256(f"{self.id}/{c}/{i}".encode()).hexdigest(),
                pixel_format="GRAY8",
                top_k=((3, 0.75), (8, 0.125)),
                score=None,
                label=3,
                preprocess_us=120,
                inference_us=340,
                latency_us=900,
                backend="numpy",
            )
            for i in range(n)
        ]

    def seal(self, n: int = 2, records: Sequence[TelemetryRecord] | None = None) -> bytes:
        """The next envelope of the chain (``n`` readings unless ``records`` are given)."""
        self.counter += 1
        recs = list(records) if records is not None else self.readings(n)
        data = seal_envelope(self.id, self.counter, self.prev, recs, T0 + self.counter, self.key)
        self.prev = envelope_hash(data)
        return data

    def seal_inferences(self, n: int, model: str = "digits@1.0.0") -> bytes:
        return self.seal(records=self.inferences(n, model))

    def seal_loss(self, first: int, last: int) -> bytes:
        """An envelope announcing that counters ``first..last`` were dropped unsent; it follows them (counter last + 1),
        as the box's next envelope does after its outbox dropped sealed envelopes."""
        self.counter = max(self.counter, last)
        notice = LossNotice(T0, envelopes_dropped=last - first + 1, records_dropped=7, first_counter=first,
                            last_counter=last)  # fmt: skip
        return self.seal(records=[notice, EventRecord(T0, "outbox.dropped", {"n": last - first + 1})])

    def msg(self, data: bytes, at: float = T0, topic: str | None = None) -> Inbound:
        return Inbound(self.topic if topic is None else topic, data, at)


class Fleet:
    """Makes devices with certificates from the session's test CA and registers them in a store."""

    def __init__(self, store: Store, pki: Any) -> None:
        self.store = store
        self.pki = pki

    def device(self, device_id: str, *, register: bool = True) -> SimDevice:
        dev = SimDevice(device_id)
        dev.cert_pem = self.pki.client(device_id, dev.key).cert.read_text()
        if register:
            self.store.add_device(dev.record())
        return dev


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL server for the session: the configured or default one, else a private one."""
    url = running_server_url()
    if url is not None:
        yield url
        return
    server = PrivateServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def private_pg() -> Iterator[str]:
    """A private PostgreSQL server (the fallback path), started only for the tests that ask for it."""
    server = PrivateServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of an empty store of the test's backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    with fresh_database(request.getfixturevalue("pg_admin_url")) as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def make_fleet(pki: Any) -> Any:
    """``make_fleet(store)``: a ``Fleet`` over any store."""
    return lambda store: Fleet(store, pki)


@pytest.fixture
def fleet(store: Store, make_fleet: Any) -> Fleet:
    return make_fleet(store)


def raw_sql(url: str, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a store's database behind its back (to corrupt or inspect it); returns rows."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite://") :], isolation_level=None)
        try:
            cur = conn.execute(sql, params)
            return cur.fetchall()
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as pg:
        cur2 = pg.execute(sql.replace("?", "%s"), params)
        return cur2.fetchall() if cur2.description else []


@pytest.fixture
def raw(store_url: str) -> Any:
    """``raw(sql, params)`` on the test's store database."""
    return lambda sql, params=(): raw_sql(store_url, sql, params)
