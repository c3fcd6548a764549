"""The claim rules (sans-IO ``decide``) and the claim book's transactions on a real SQLite file."""

from __future__ import annotations

import threading

import pytest

from edge.errors import ConfigError
from edge.fleet.onboard.claims import ClaimBook, ClaimRefused, ClaimRow, ClaimState, Verdict, decide

NOW = 1_800_000_000.0


def row(**kw) -> ClaimRow:
    base = {
        "claim_id": "abc",
        "device_id": None,
        "approval": "auto",
        "state": ClaimState.OPEN,
        "created": NOW - 10,
        "expires": NOW + 100,
    }
    return ClaimRow(**{**base, **kw})


def refused(r: ClaimRow | None, **kw) -> str:
    with pytest.raises(ClaimRefused) as e:
        decide(r, **{"did": "did:a", "device_id": "box-1", "now": NOW, **kw})
    return e.value.reason


def test_decide() -> None:
    assert decide(row(), did="did:a", device_id="box-1", now=NOW) is Verdict.ISSUE
    assert refused(None) == "unknown"
    assert refused(row(state=ClaimState.REVOKED)) == "revoked"
    assert refused(row(expires=NOW - 1)) == "expired"
    assert refused(row(device_id="pi-kitchen")) == "device_id"
    assert refused(row(state=ClaimState.USED, did="did:b")) == "used"
    assert refused(row(state=ClaimState.PENDING, did="did:b")) == "used"  # another box waits on it
    # The box the claim is bound to may repeat, even after the claim's expiry (it finishes what it began).
    assert decide(row(state=ClaimState.USED, did="did:a", expires=NOW - 1), did="did:a", device_id="box-1", now=NOW)
    assert decide(row(approval="manual"), did="did:a", device_id="box-1", now=NOW) is Verdict.WAIT
    assert decide(row(approval="manual", state=ClaimState.APPROVED), did="did:a", device_id="box-1", now=NOW) is (
        Verdict.ISSUE
    )


def test_one_claim_redeemed_by_many_keys_at_once_goes_to_exactly_one(tmp_path) -> None:
    path = tmp_path / "claims.sqlite"
    book = ClaimBook(path)
    code, _ = book.create(host="h", port=1, ca_fingerprint=bytes(32), now=NOW, ttl_s=100)
    book.close()
    wins: list[str] = []
    losses: list[str] = []

    def attempt(i: int) -> None:
        b = ClaimBook(path)  # a connection per thread, as separate endpoint processes would have
        try:
            b.redeem(code.secret, did=f"did:{i}", device_id=f"box-{i}", now=NOW)
            wins.append(f"did:{i}")
        except ClaimRefused as e:
            losses.append(e.reason)
        finally:
            b.close()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert losses == ["used"] * 7
    book = ClaimBook(path)
    assert book.list()[0].did == wins[0]
    book.close()


def test_revoke_approve_and_release(tmp_path) -> None:
    book = ClaimBook(tmp_path / "claims.sqlite")
    code, r = book.create(host="h", port=1, ca_fingerprint=bytes(32), now=NOW, ttl_s=100, approval="manual")
    assert book.redeem(code.secret, did="did:a", device_id="box-1", now=NOW)[0] is Verdict.WAIT
    assert book.approve(r.claim_id).state is ClaimState.APPROVED
    verdict, used = book.redeem(code.secret, did="did:a", device_id="box-1", now=NOW)
    assert verdict is Verdict.ISSUE and used.state is ClaimState.USED
    with pytest.raises(ConfigError):
        book.revoke(r.claim_id)  # used: revoke the device instead
    book.release(r.claim_id, "did:a")  # the registry refused the id: the owner may retry
    assert book.get(r.claim_id).state is ClaimState.APPROVED
    with pytest.raises(ConfigError):
        book.approve("nope")
    code2, r2 = book.create(host="h", port=1, ca_fingerprint=bytes(32), now=NOW, ttl_s=100)
    book.revoke(r2.claim_id)
    with pytest.raises(ClaimRefused):
        book.redeem(code2.secret, did="did:a", device_id="box-1", now=NOW)
    with pytest.raises(ConfigError):
        book.create(host="h", port=1, ca_fingerprint=bytes(32), now=NOW, ttl_s=100, approval="sometimes")
    book.close()


def test_claims_create_prints_codes_and_qr_labels_and_names_what_is_missing(tmp_path, edge_cli) -> None:
    from edge.wire.onboard import parse_claim  # noqa: PLC0415

    fleet = str(tmp_path / "fleet")
    assert edge_cli("fleet", "--dir", fleet, "ca", "init").returncode == 0
    # No endpoint recorded and none given: the error says which option and how to get one.
    proc = edge_cli("fleet", "--dir", fleet, "claims", "create")
    assert proc.returncode == 2
    assert "--server" in proc.stderr and "Traceback" not in proc.stderr
    proc = edge_cli(
        "fleet", "--dir", fleet, "claims", "create", "--server", "fleet.example.net:8443", "--count", "2",
        "--qr-dir", str(tmp_path / "labels"), "--qr", "terminal",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    codes = [parse_claim(line) for line in proc.stdout.split()]
    assert len(codes) == 2 and codes[0].secret != codes[1].secret
    assert {c.endpoint for c in codes} == {"fleet.example.net:8443"}
    pngs = sorted((tmp_path / "labels").glob("claim-*.png"))
    assert [p.name for p in pngs] == sorted(f"claim-{c.claim_id}.png" for c in codes)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert "\u2588" in proc.stderr or "\u2580" in proc.stderr  # the terminal QR's block characters
    # The endpoint is recorded: the next codes need no --server.
    again = edge_cli("fleet", "--dir", fleet, "claims", "create", "--device-id", "pi-kitchen")
    assert again.returncode == 0, again.stderr
    assert parse_claim(again.stdout.strip()).device_id == "pi-kitchen"
    # A pinned id is for one code only; an invalid one is named.
    bad = edge_cli("fleet", "--dir", fleet, "claims", "create", "--device-id", "pi", "--count", "2")
    assert bad.returncode == 2 and "--device-id" in bad.stderr
    bad = edge_cli("fleet", "--dir", fleet, "claims", "create", "--device-id", "../etc")
    assert bad.returncode == 2 and "--device-id" in bad.stderr
