"""A hostile box for tests and the hostile stress benchmark: an enrolled box whose owner runs their own software.

It holds its own key and certificate, so everything it publishes on its own topics passes the broker, and whatever
it signs passes the signature check; it may build any CBOR and JSON it likes. ``HostileBox.round`` makes one round
of every attack it has, each tagged with its kind, on every topic its ACL lets it write (and on some it does not).
What must hold for each is in the tests (``test_hostile_fleet.py``) and the benchmark (``tools/bench/hostile.py``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gateway_helpers import SimDevice, inference_records

from edge.fleet.pki.registry import MAX_PACKET_BYTES
from edge.wire.cose import ALG_EDDSA, HEADER_ALG, HEADER_KID, sign1
from edge.wire.envelope import (
    GENESIS_PREV,
    P_COUNTER,
    P_CREATED,
    P_DEVICE,
    P_PREV,
    P_RECORDS,
    P_VERSION,
    SCHEMA_VERSION,
    envelope_hash,
)
from edge.wire.schema import K_TYPE, TYPE_LOSS, record_to_item

__all__ = ["Attack", "HostileBox", "sim_device"]


@dataclass(frozen=True)
class Attack:
    """One message: what it tries (``kind``), where, how.

    ``allowed``: the broker lets this box publish it (False: the ACL refuses it, or the broker drops the box for it).
    ``stored``: a correct gateway stores it as an accepted envelope (all others are quarantined, counted duplicates,
    or never reach the gateway).
    """

    kind: str
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    allowed: bool = True
    stored: bool = False


def _deep(n: int) -> bytes:
    """A CBOR array nested ``n`` deep (a decoder that recurses without a bound overflows its stack)."""
    return b"\x81" * n + b"\x00"


@dataclass
class HostileBox:
    """An enrolled box (``device_id``, its enrolled ``key``) attacking the fleet, and a ``victim`` it would hurt."""

    device_id: str
    key: Ed25519PrivateKey
    victim: str
    seed: int = 0
    counter: int = 0
    prev: bytes = GENESIS_PREV
    _accepted: list[bytes] = field(default_factory=list)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # -- envelopes built from raw CBOR: a hostile box skips every check `seal_envelope` makes -------------------

    def _signed(self, payload: dict[int, Any], kid: str | None = None, key: Ed25519PrivateKey | None = None) -> bytes:
        protected = {HEADER_ALG: ALG_EDDSA, HEADER_KID: (kid or self.device_id).encode()}
        return sign1(cbor2.dumps(payload), key or self.key, protected=protected, unprotected={})

    def _payload(self, records: list[Any], counter: int, device: str | None = None, created: Any = None) -> dict:
        return {
            P_VERSION: SCHEMA_VERSION,
            P_DEVICE: device or self.device_id,
            P_COUNTER: counter,
            P_PREV: self.prev,
            P_CREATED: time.time() if created is None else created,
            P_RECORDS: records,
        }

    def _forged(self, records: list[Any], **how: Any) -> bytes:
        """An envelope at the next counter, not kept in its chain; ``how``: counter, device, created, kid, key."""
        payload = self._payload(records, how.get("counter", self.counter + 1), how.get("device"), how.get("created"))
        return self._signed(payload, how.get("kid"), how.get("key"))

    def _next(self, records: list[Any]) -> bytes:
        """The next envelope of its own chain (accepted by a correct gateway if ``records`` are valid)."""
        self.counter += 1
        data = self._signed(self._payload(records, self.counter))
        self.prev = envelope_hash(data)
        self._accepted.append(data)
        return data

    def _items(self, n: int, change: dict[int, Any] | None = None) -> list[dict[int, Any]]:
        # Salted with the time: a round's inputs are new even when the counter repeats (forged envelopes).
        recs = inference_records(self.device_id, self.counter + 1, n, salt=f"/{time.time()}")
        items = [record_to_item(r) for r in recs]
        for item in items:
            item.update(change or {})
        return items

    # -- one round of everything ------------------------------------------------------------------------------------

    def round(self) -> Iterator[Attack]:
        """One message of every kind, in a random order within the round; valid envelopes keep its chain going."""
        rng = self._rng
        me, victim = f"devices/{self.device_id}", f"devices/{self.victim}"
        t = f"{me}/telemetry"
        attacks: list[Attack] = []

        def add(kind: str, payload: bytes, topic: str = t, **how: Any) -> None:
            attacks.append(Attack(kind, topic, payload, **how))

        # Replays first (of envelopes accepted in earlier rounds): then the valid ones below extend the chain.
        if self._accepted:
            add("replay", rng.choice(self._accepted))
        # Forgeries and lies about identity, at the next counter.
        good = self._forged(self._items(3))
        add("bad_signature", good[:-1] + bytes([good[-1] ^ 1]))
        add("truncated", good[: rng.randrange(1, len(good))])
        add("unregistered_key", self._forged(self._items(3), key=Ed25519PrivateKey.generate()))
        add("claims_victim_id", self._forged(self._items(3), device=self.victim, kid=self.victim))
        add("victim_kid", self._forged(self._items(3), kid=self.victim))
        # Numbers no box can mean.
        add(
            "loss_bomb", self._forged([{K_TYPE: TYPE_LOSS, 1: time.time(), 2: 2**63 - 1, 3: 2**64 - 1, 4: 1, 5: 2**62}])
        )
        # Within the counter range, but more records than its one dropped envelope could have held.
        add("loss_records_over", self._forged([{K_TYPE: TYPE_LOSS, 1: time.time(), 2: 1, 3: 1001, 4: 1, 5: 1}]))
        add("counter_2^63", self._forged(self._items(1), counter=2**63))
        add("created_nan", self._forged(self._items(1), created=math.nan))
        add("float_key", self._forged([{1.0 if k == 1 else k: v for k, v in i.items()} for i in self._items(2)]))
        add("bool_key", self._forged([{True if k == 1 else k: v for k, v in i.items()} for i in self._items(2)]))
        add("control_chars", self._forged(self._items(2, {3: "digits\x00\x1b[31m@1"})))
        add("1001_records", self._forged(self._items(1001)))
        # Bytes that attack decoders.
        add("random", rng.randbytes(rng.randrange(1, 4096)))
        add("deep_cbor", _deep(100_000))
        add("declared_2^63_bytes", b"\x5b" + (2**63 - 1).to_bytes(8, "big") + b"x" * 64)
        add("empty", b"")
        add("random_qos0", rng.randbytes(64), qos=0)
        # Valid work, and valid but worthless work: stored, and credited by the ledger's rules only.
        if self.counter:
            fork = self._payload(self._items(2), self.counter)  # a second, different envelope for a used counter
            add("fork", self._signed(fork))
        add("valid", self._next(self._items(5)), stored=True)
        same = self._items(20)
        for item in same:  # one frame claimed twenty times
            item[5] = same[0][5]
        add("same_input_x20", self._next(same), stored=True)
        add("future_work", self._next(self._items(5, {1: time.time() + 86_400.0})), stored=True)
        # Status: the JSON path, retained or not.
        s = f"{me}/status"
        add("status_deep", b"[" * 100_000 + b"]" * 100_000, s)
        add("status_deep_retained", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, s, retain=True)
        add("status_nan", b'{"state": "online", "x": NaN}', s)
        add("status_dup_keys", b'{"state": "online", "state": "offline"}', s)
        add("status_bad_utf8", b'{"state": "\xff\xfe"}', s)
        add("status_surrogate", b'{"state": "\\ud800"}', s)
        add("status_huge_number", b'{"outbox_backlog": 1e999}', s)
        add("status_big_int", b'{"outbox_backlog": ' + b"9" * 5000 + b"}", s)
        add("status_not_object", b"[1, 2, 3]", s)
        add("status_17KiB", json.dumps({"state": "online", "pad": "x" * 17_000}).encode(), s)
        add("status_claims_victim", json.dumps({"state": "offline", "device_id": self.victim}).encode(), s)
        add("status_random", rng.randbytes(rng.randrange(1, 512)), s)
        # Replies: nobody waits for them, but they must not hurt either.
        add("replies_random", rng.randbytes(256), f"{me}/replies")
        add("replies_deep", b"[" * 50_000, f"{me}/replies")
        # Topics its ACL refuses: the broker answers "not authorized" and nothing reaches the gateway.
        for kind, topic in (
            ("victim_telemetry", f"{victim}/telemetry"),
            ("victim_status", f"{victim}/status"),
            ("own_commands", f"{me}/commands"),
            ("victim_commands", f"{victim}/commands"),
            ("dynsec_control", "$CONTROL/dynamic-security/v1"),
        ):
            add(kind, b'{"state": "offline"}', topic, allowed=False)
        yield from attacks

    def oversized(self) -> Attack:
        """A publish over the broker's packet limit: the broker disconnects the box for it."""
        return Attack("oversized", f"devices/{self.device_id}/telemetry", b"\0" * (MAX_PACKET_BYTES + 1),
                      allowed=False)  # fmt: skip


def sim_device(device_id: str, key: Ed25519PrivateKey) -> SimDevice:
    """An honest ``SimDevice`` that signs with an enrolled box's key."""
    d = SimDevice(device_id)
    d.key = key
    return d
