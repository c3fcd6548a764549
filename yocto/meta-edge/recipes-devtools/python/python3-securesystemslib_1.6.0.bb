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

# The sdist pins its build backend (requires = ["hatchling==1.32.4"]); wrynose ships hatchling 1.29.0, which builds
# it. bitbake builds without isolation, so the pin would stop the build at "Missing dependencies".
PEP517_BUILD_OPTS = "--skip-dependency-check"

# The package ships a maintainer script of its vendored ed25519 copy (executable, #!/bin/bash), which nothing imports
# or runs. Installed, it would make the package need bash (wrynose's file-rdeps QA error): it is not installed.
do_install:append() {
    rm ${D}${PYTHON_SITEPACKAGES_DIR}/securesystemslib/_vendor/test-ed25519-upstream.sh
}

# What `import securesystemslib.signer` loads (tuf.api.metadata imports it): shlex through its GPG constants, hashlib,
# datetime.
RDEPENDS:${PN} += "python3-core python3-crypt python3-cryptography python3-datetime python3-json python3-logging \
                   python3-netclient python3-shell"

CVE_PRODUCT = "securesystemslib"

BBCLASSEXTEND = "native nativesdk"
