SUMMARY = "Consistent Overhead Byte Stuffing (COBS) encoding and decoding"
DESCRIPTION = "Python functions for encoding and decoding COBS and COBS/R, with a C extension and a pure Python \
               fallback. edge frames its serial sensor protocol with it. Neither oe-core nor meta-python has a \
               recipe for it."
HOMEPAGE = "https://github.com/cmcqueen/cobs-python"
BUGTRACKER = "https://github.com/cmcqueen/cobs-python/issues"
SECTION = "devel/python"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE.txt;md5=99b98409d812a244309c8137a9e3aeea"

SRC_URI[sha256sum] = "dbdd5e32111d72786f83d0c269215dcd6ac629b1ac1962c6878221f3b2ca98da"

inherit pypi python_setuptools_build_meta

RDEPENDS:${PN} += "python3-core"

CVE_PRODUCT = "cobs"

BBCLASSEXTEND = "native nativesdk"
