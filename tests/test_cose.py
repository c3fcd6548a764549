"""COSE_Sign1 with EdDSA: the COSE WG conformance vector, and each way a message can be wrong."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.errors import InputError
from edge.wire.cose import decode_sign1, sig_structure, sign1, verify1
from edge.wire.errors import BadSignatureError, MalformedEnvelopeError, UnsupportedAlgorithmError

# COSE WG Examples, eddsa-sig-01.json ("EdDSA - 25519 - sign0"), transcribed: the key is RFC 8032 TEST 1.
VECTOR_D = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
VECTOR_X = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
VECTOR_PROTECTED = bytes.fromhex("A201270300")  # {1: -8 (EdDSA), 3: 0 (content type)}
VECTOR_PAYLOAD = b"This is the content."
VECTOR_TO_BE_SIGNED = bytes.fromhex("846A5369676E61747572653145A2012703004054546869732069732074686520636F6E74656E742E")
VECTOR_OUTPUT = bytes.fromhex(
    "D28445A201270300A10442313154546869732069732074686520636F6E74656E742E5840"
    "7142FD2FF96D56DB85BEE905A76BA1D0B7321A95C8C4D3607C5781932B7AFB87"
    "11497DFA751BF40B58B3BCC32300B1487F3DB34085EEF013BF08F4A44D6FEF0D"
)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(VECTOR_D)


def _parts(data: bytes) -> list[object]:
    return list(cbor2.loads(data).value)


def _reassemble(parts: list[object], tag: int = 18) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, parts))


def test_cose_wg_vector_sign_is_byte_exact(key: Ed25519PrivateKey) -> None:
    assert key.public_key().public_bytes_raw() == VECTOR_X
    out = sign1(VECTOR_PAYLOAD, key, protected={1: -8, 3: 0}, unprotected={4: b"11"})
    assert out == VECTOR_OUTPUT


def test_cose_wg_vector_to_be_signed() -> None:
    assert sig_structure(VECTOR_PROTECTED, VECTOR_PAYLOAD) == VECTOR_TO_BE_SIGNED


def test_cose_wg_vector_verifies(key: Ed25519PrivateKey) -> None:
    protected, unprotected, payload = verify1(VECTOR_OUTPUT, key.public_key())
    assert protected == {1: -8, 3: 0} and unprotected == {4: b"11"} and payload == VECTOR_PAYLOAD


def test_external_aad_is_bound(key: Ed25519PrivateKey) -> None:
    msg = sign1(b"x", key, protected={1: -8}, unprotected={}, external_aad=b"topic-a")
    verify1(msg, key.public_key(), external_aad=b"topic-a")
    with pytest.raises(BadSignatureError):
        verify1(msg, key.public_key(), external_aad=b"topic-b")


def test_tampered_payload_bad_signature(key: Ed25519PrivateKey) -> None:
    parts = _parts(VECTOR_OUTPUT)
    parts[2] = b"This is the content!"
    with pytest.raises(BadSignatureError):
        verify1(_reassemble(parts), key.public_key())


def test_tampered_protected_header_bad_signature(key: Ed25519PrivateKey) -> None:
    parts = _parts(VECTOR_OUTPUT)
    parts[0] = bytes.fromhex("A201270301")  # content type 0 -> 1, alg still EdDSA
    with pytest.raises(BadSignatureError):
        verify1(_reassemble(parts), key.public_key())


def test_protected_header_reencoded_bad_signature(key: Ed25519PrivateKey) -> None:
    # The same map with a non-shortest integer head: a verifier that re-encoded the decoded map would accept it.
    parts = _parts(VECTOR_OUTPUT)
    parts[0] = bytes.fromhex("A20127031800")  # {1: -8, 3: 0} with 0 as 0x18 0x00
    assert cbor2.loads(parts[0]) == {1: -8, 3: 0}
    with pytest.raises(BadSignatureError):
        verify1(_reassemble(parts), key.public_key())


def test_wrong_key_bad_signature() -> None:
    with pytest.raises(BadSignatureError) as info:
        verify1(VECTOR_OUTPUT, Ed25519PrivateKey.generate().public_key())
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("cut", [1, 10, len(VECTOR_OUTPUT) // 2, len(VECTOR_OUTPUT) - 1])
def test_truncated_message_malformed(key: Ed25519PrivateKey, cut: int) -> None:
    with pytest.raises(MalformedEnvelopeError):
        verify1(VECTOR_OUTPUT[:cut], key.public_key())


def test_trailing_bytes_malformed(key: Ed25519PrivateKey) -> None:
    with pytest.raises(MalformedEnvelopeError, match="trailing"):
        verify1(VECTOR_OUTPUT + b"\x00", key.public_key())


def test_not_tag_18_malformed(key: Ed25519PrivateKey) -> None:
    parts = _parts(VECTOR_OUTPUT)
    with pytest.raises(MalformedEnvelopeError):
        verify1(_reassemble(parts, tag=98), key.public_key())  # COSE_Sign (multi-signer), not Sign1
    with pytest.raises(MalformedEnvelopeError, match="tag 18"):
        verify1(cbor2.dumps(parts), key.public_key())  # untagged


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p[:3],
        lambda p: [*p, b""],
        lambda p: [cbor2.loads(p[0]), *p[1:]],  # protected as a map, not a bstr
        lambda p: [p[0], [], *p[2:]],
        lambda p: [p[0], p[1], None, p[3]],  # detached payload
        lambda p: [*p[:3], p[3][:63]],
    ],
)
def test_wrong_shape_malformed(key: Ed25519PrivateKey, mutate: object) -> None:
    parts = mutate(_parts(VECTOR_OUTPUT))  # type: ignore[operator]
    with pytest.raises(MalformedEnvelopeError):
        verify1(_reassemble(parts), key.public_key())


@pytest.mark.parametrize(
    ("protected", "unprotected"),
    [
        ({1: -7}, {}),  # ES256 named, signed with Ed25519 bytes: algorithm substitution
        ({1: "EdDSA"}, {}),
        ({}, {1: -8}),  # alg only in the unprotected (unsigned) header
        ({1: -8}, {1: -8}),
        ({1: -8, 2: [3]}, {}),  # a critical header we do not understand
        ({1: -8, 4: b"a"}, {4: b"b"}),
    ],
)
def test_wrong_algorithm_rejected(key: Ed25519PrivateKey, protected: dict[int, object], unprotected: dict) -> None:  # type: ignore[type-arg]
    prot = cbor2.dumps(protected) if protected else b""
    sig = key.sign(sig_structure(prot, b"x"))
    with pytest.raises(UnsupportedAlgorithmError):
        verify1(_reassemble([prot, unprotected, b"x", sig]), key.public_key())


def test_tags_inside_headers_malformed(key: Ed25519PrivateKey) -> None:
    prot = cbor2.dumps({1: -8, 99: cbor2.CBORTag(1, 0)})
    sig = key.sign(sig_structure(prot, b"x"))
    with pytest.raises(MalformedEnvelopeError):
        decode_sign1(_reassemble([prot, {}, b"x", sig]))


def test_sign1_refuses_other_algorithms(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="EdDSA"):
        sign1(b"x", key, protected={1: -7}, unprotected={})
