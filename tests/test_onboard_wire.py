"""The onboarding contract without a network: claim codes, bundles, the claim rules and the renewal schedule."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.enrollment.procedure import renewal_due
from edge.wire.onboard import Bundle, ClaimCode, ClaimError, decode_bundle, encode_bundle, parse_claim

SECRET = bytes(range(16))
FP = bytes(range(32))


def test_a_claim_code_reads_back_as_written() -> None:
    for host in ("fleet.example.net", "10.0.0.7", "::1"):
        for device_id in (None, "pi-kitchen"):
            code = ClaimCode(host, 8443, SECRET, FP, device_id)
            assert parse_claim(code.text()) == code
            assert parse_claim(f"  {code.text()}\n") == code  # a claim file's newline


def test_the_redacted_form_never_shows_the_secret() -> None:
    code = ClaimCode("fleet.example.net", 8443, SECRET, FP)
    assert code.secret_text not in code.redacted()
    assert code.claim_id in code.redacted()


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("https://fleet:8443/AAAA#BBBB", "starts with edge-claim://"),
        ("edge-claim://fleet:8443/" + "A" * 26, "no CA fingerprint"),
        ("edge-claim://fleet:8443#" + "A" * 52, "no secret"),
        ("edge-claim://fleet/" + "A" * 26 + "#" + "A" * 52, "HOST:PORT"),
        ("edge-claim://fleet:99999/" + "A" * 26 + "#" + "A" * 52, "HOST:PORT"),
        ("edge-claim://fl_eet:8443/" + "A" * 26 + "#" + "A" * 52, "host"),
        ("edge-claim://[nope]:8443/" + "A" * 26 + "#" + "A" * 52, "IPv6"),
        ("edge-claim://fleet:8443/" + "A" * 25 + "#" + "A" * 52, "secret"),
        ("edge-claim://fleet:8443/" + "1" * 26 + "#" + "A" * 52, "secret"),
        ("edge-claim://fleet:8443/" + "A" * 26 + "#" + "A" * 51, "fingerprint"),
        ("edge-claim://fleet:8443/" + "A" * 26 + "?who=x#" + "A" * 52, "?id="),
        ("edge-claim://fleet:8443/" + "A" * 26 + "?id=../etc#" + "A" * 52, "device id"),
        ("edge-claim://" + "a" * 600, "at most"),
    ],
)
def test_a_malformed_claim_code_names_the_part_at_fault(text: str, part: str) -> None:
    with pytest.raises(ClaimError) as e:
        parse_claim(text)
    assert part in str(e.value)


@given(st.text(max_size=300))
def test_no_text_makes_the_parser_fail_other_than_with_claim_error(text: str) -> None:
    with contextlib.suppress(ClaimError):
        parse_claim(text)


@given(st.binary(max_size=2000))
def test_no_bytes_make_the_bundle_decoder_fail_other_than_with_claim_error(data: bytes) -> None:
    with contextlib.suppress(ClaimError):
        decode_bundle(data)


def test_a_bundle_reads_back_and_a_malformed_one_is_refused() -> None:
    b = Bundle("box-1", "CA", "CMD", "RCPT", "broker.example.net", 8883, '{"signed": {}}', "https://models/")
    assert decode_bundle(encode_bundle(b)) == b
    for broken in (
        encode_bundle(b).replace(b'"port": 8883', b'"port": 0'),
        encode_bundle(b).replace(b'"version": 1', b'"version": 2'),
        encode_bundle(b).replace(b'"device_id": "box-1"', b'"device_id": "../x"'),
        b"[]",
        os.urandom(64),
    ):
        with pytest.raises(ClaimError):
            decode_bundle(broken)


def test_renewal_is_due_with_a_third_of_the_lifetime_left() -> None:
    start, end = 0.0, 30 * 86400.0
    assert not renewal_due(start, end, 19 * 86400.0)
    assert renewal_due(start, end, 20 * 86400.0)
    assert renewal_due(start, end, 31 * 86400.0)
