SUMMARY = "The Update Framework (TUF): a framework for securing software update systems"
DESCRIPTION = "python-tuf's Metadata API and ngclient. edge's over-the-air model updates verify the fleet's model \
               repository with ngclient on the box. Neither oe-core nor meta-python has a recipe for it."
HOMEPAGE = "https://theupdateframework.io"
BUGTRACKER = "https://github.com/theupdateframework/python-tuf/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0 | MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=8cc789b082b3d97e1ccc5261f8594d3f \
                    file://LICENSE-MIT;md5=0905c600830081fce64622608c4a2628"

SRC_URI[sha256sum] = "5ada1db78da3518fa851e28588f4b2249b8662a28ae528f54afa2a1de541fb31"

inherit pypi python_hatchling

# The sdist pins its build backend (requires = ["hatchling==1.32.0"]); wrynose ships hatchling 1.29.0, which builds
# it. bitbake builds without isolation, so the pin would stop the build at "Missing dependencies".
PEP517_BUILD_OPTS = "--skip-dependency-check"

RDEPENDS:${PN} += "python3-core python3-crypt python3-datetime python3-io python3-json python3-logging \
                   python3-netclient python3-securesystemslib python3-urllib3"

CVE_PRODUCT = "python-tuf"

BBCLASSEXTEND = "native nativesdk"
