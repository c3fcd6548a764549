SUMMARY = "Cryptographic signing and verification routines for TUF and in-toto"
DESCRIPTION = "securesystemslib's signer API: python-tuf verifies metadata signatures through it (Ed25519 keys \
               through python3-cryptography). Neither oe-core nor meta-python has a recipe for it."
HOMEPAGE = "https://github.com/secure-systems-lab/securesystemslib"
BUGTRACKER = "https://github.com/secure-systems-lab/securesystemslib/issues"
SECTION = "devel/python"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=e9703d169911cdb29305f88411c78717"

SRC_URI[sha256sum] = "b16e07c32bb41174c2ee2fb18f478ebe0d52e0e7c1fb085ce89c990452a35977"

inherit pypi python_hatchling

RDEPENDS:${PN} += "python3-core python3-cryptography python3-json python3-logging python3-netclient"

CVE_PRODUCT = "securesystemslib"

BBCLASSEXTEND = "native nativesdk"
