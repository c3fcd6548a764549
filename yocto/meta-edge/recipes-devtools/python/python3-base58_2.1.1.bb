SUMMARY = "Base58 and Base58Check encoding, as the bitcoin network uses it"
DESCRIPTION = "A pure Python implementation of Base58 and Base58Check. edge writes its did:key identifiers with \
               it. Neither oe-core nor meta-python has a recipe for it."
HOMEPAGE = "https://github.com/keis/base58"
BUGTRACKER = "https://github.com/keis/base58/issues"
SECTION = "devel/python"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://COPYING;md5=71074cfe47bd07c35127d81190aafd41"

SRC_URI[sha256sum] = "c5d0cb3f5b6e81e8e35da5754388ddcc6d0d14b6c6a132cb93d69ed580a7278c"

# base58 2.1.1 has no pyproject.toml: setup.cfg and setup.py only.
inherit pypi setuptools3

RDEPENDS:${PN} += "python3-core python3-crypt"

CVE_PRODUCT = "base58"

BBCLASSEXTEND = "native nativesdk"
