"""The fleet CA: what it writes, what it certifies, and every CSR it must refuse (named after the attack)."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.fleet.pki.ca import EnrollmentError, FleetCA
from edge.identity import build_csr, did_key_from_public
from edge.identity.errors import InvalidDeviceIdError, KeyExistsError, KeyPermissionError

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


@pytest.fixture
def ca(tmp_path) -> FleetCA:
    return FleetCA.init(tmp_path / "fleet", now=NOW)


def csr(
    key,
    cn: str | None = "cam-1",
    uris: list[str] | None = None,
    *,
    extra_names=(),
    extensions=(),
    subject_extra=(),
) -> bytes:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    attrs += list(subject_extra)
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if uris is None and isinstance(key, Ed25519PrivateKey):
        uris = [did_key_from_public(key.public_key())]
    names = [x509.UniformResourceIdentifier(u) for u in uris or []] + list(extra_names)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    algorithm = None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def refused(ca: FleetCA, pem: bytes) -> EnrollmentError:
    with pytest.raises(EnrollmentError) as info:
        ca.sign_csr(pem, now=NOW)
    return info.value


def test_init_writes_ca_and_command_key_with_private_modes(ca, tmp_path) -> None:
    d = tmp_path / "fleet"
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (d / "commands.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    cert.verify_directly_issued_by(cert)  # self-signed
    pub = serialization.load_pem_public_key((d / "commands.pub").read_bytes())
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert pub.public_bytes(*raw) == ca.commands_public.public_bytes(*raw)
    # The command key is not the CA key: a leaked TLS identity or CA compromise are separate from commanding boxes.
    assert ca.commands_public.public_bytes(*raw) != cert.public_key().public_bytes(*raw)
    loaded = FleetCA.load(d)
    assert loaded.cert_pem == ca.cert_pem


def test_init_refuses_to_replace_an_existing_ca(ca, tmp_path) -> None:
    with pytest.raises(KeyExistsError):
        FleetCA.init(tmp_path / "fleet", now=NOW)
    replaced = FleetCA.init(tmp_path / "fleet", now=NOW, force=True)
    assert replaced.cert_pem != ca.cert_pem


def test_ca_key_readable_by_others_refused(ca, tmp_path) -> None:
    (tmp_path / "fleet" / "ca.key").chmod(0o644)
    with pytest.raises(KeyPermissionError):
        FleetCA.load(tmp_path / "fleet")


def test_swapped_ca_certificate_refused(ca, tmp_path) -> None:
    other = FleetCA.init(tmp_path / "other", now=NOW)
    (tmp_path / "fleet" / "ca.pem").write_bytes(other.cert_pem)
    with pytest.raises(ValueError, match="certificate of the key"):
        FleetCA.load(tmp_path / "fleet")


def test_sign_csr_issues_a_client_certificate_for_the_device_key(ca) -> None:
    key = Ed25519PrivateKey.generate()
    issued = ca.sign_csr(build_csr(key, "cam-1"), now=NOW)
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert issued.device_id == "cam-1"
    assert issued.did == did_key_from_public(key.public_key())
    assert issued.public_key == key.public_key().public_bytes(*raw)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.serial_number == issued.serial
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [issued.did]
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert aki == ca_ski
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=825)


def test_tampered_csr_rejected_without_proof_of_possession(ca) -> None:
    # The CN is changed after signing: the request no longer proves the key holder asked for this identity.
    der = x509.load_pem_x509_csr(build_csr(Ed25519PrivateKey.generate(), "cam-1")).public_bytes(
        serialization.Encoding.DER
    )
    forged = der.replace(b"cam-1", b"cam-9")
    pem = x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM)
    assert refused(ca, pem).reason == "signature"


def test_csr_with_non_ed25519_key_rejected(ca) -> None:
    assert refused(ca, csr(ec.generate_private_key(ec.SECP256R1()), uris=["did:key:z6Mkx"])).reason == "key_type"


def test_csr_with_path_traversal_device_id_rejected(ca) -> None:
    e = refused(ca, csr(Ed25519PrivateKey.generate(), cn="../../etc"))
    assert e.reason == "device_id" and "invalid device id" in str(e)


def test_csr_with_wildcard_topic_device_id_rejected(ca) -> None:
    assert refused(ca, csr(Ed25519PrivateKey.generate(), cn="#")).reason == "device_id"


def test_csr_claiming_another_keys_did_rejected(ca) -> None:
    victim = did_key_from_public(Ed25519PrivateKey.generate().public_key())
    e = refused(ca, csr(Ed25519PrivateKey.generate(), uris=[victim]))
    assert e.reason == "did_mismatch"


def test_csr_with_extra_names_rejected(ca) -> None:
    key = Ed25519PrivateKey.generate()
    assert refused(ca, csr(key, extra_names=[x509.DNSName("broker.example")])).reason == "san"
    did = did_key_from_public(key.public_key())
    assert refused(ca, csr(key, uris=[did, did + "x"])).reason == "san"
    assert refused(ca, csr(key, uris=[])).reason == "san"


def test_csr_with_extra_subject_attributes_rejected(ca) -> None:
    extra = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway")]
    assert refused(ca, csr(Ed25519PrivateKey.generate(), subject_extra=extra)).reason == "subject"
    assert refused(ca, csr(Ed25519PrivateKey.generate(), cn=None)).reason == "subject"


def test_csr_requesting_ca_rights_still_gets_a_leaf(ca) -> None:
    ask = [(x509.BasicConstraints(ca=True, path_length=None), True)]
    issued = ca.sign_csr(csr(Ed25519PrivateKey.generate(), extensions=ask), now=NOW)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize(
    "data", [b"", b"not pem", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"]
)
def test_garbage_csr_rejected(ca, data) -> None:
    assert refused(ca, data).reason == "pem"


def test_oversized_csr_rejected_before_parsing(ca) -> None:
    assert refused(ca, b"A" * 100_000).reason == "pem"


def test_device_certificate_never_outlives_the_ca(tmp_path) -> None:
    short = FleetCA.init(tmp_path / "short", days=10, now=NOW)
    issued = short.sign_csr(build_csr(Ed25519PrivateKey.generate(), "cam-1"), now=NOW, days=825)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert cert.not_valid_after_utc == short.certificate.not_valid_after_utc


def test_issue_server_names_every_host(ca) -> None:
    cert_pem, key_pem = ca.issue_server(["127.0.0.1", "broker.local"], now=NOW, days=30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["broker.local"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    with pytest.raises(ValueError):
        ca.issue_server([], now=NOW)


def test_issue_client_for_a_gateway_identity(ca) -> None:
    cert_pem, key_pem = ca.issue_client("gateway", now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gateway"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert isinstance(serialization.load_pem_private_key(key_pem, None), Ed25519PrivateKey)
    with pytest.raises(InvalidDeviceIdError):
        ca.issue_client("devices/#", now=NOW)


def test_crl_names_revoked_serials_and_is_signed_by_the_ca(ca) -> None:
    crl = x509.load_pem_x509_crl(ca.crl([(1234, NOW.timestamp()), (99, NOW.timestamp() - 10)], now=NOW))
    ca_key = ca.certificate.public_key()
    assert isinstance(ca_key, Ed25519PublicKey)
    assert crl.is_signature_valid(ca_key)
    assert {r.serial_number for r in crl} == {1234, 99}
    assert crl.get_revoked_certificate_by_serial_number(1234).revocation_date_utc == NOW
    # A local CRL file must not lapse: OpenSSL refuses every client once nextUpdate has passed.
    assert crl.next_update_utc is not None and crl.next_update_utc >= NOW + datetime.timedelta(days=365)
    later = x509.load_pem_x509_crl(ca.crl([], now=NOW + datetime.timedelta(seconds=1)))
    number = x509.CRLNumber
    assert later.extensions.get_extension_for_class(number).value.crl_number > (
        crl.extensions.get_extension_for_class(number).value.crl_number
    )
    assert len(list(later)) == 0
