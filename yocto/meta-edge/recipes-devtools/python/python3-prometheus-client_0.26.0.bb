SUMMARY = "Python client for the Prometheus monitoring system"
DESCRIPTION = "Metrics (counters, gauges, histograms) and their exposition over HTTP. The fleet gateway \
               (edge-fleet) serves its metrics with it; boxes do not install it. Neither oe-core nor meta-python \
               has a recipe for it."
HOMEPAGE = "https://github.com/prometheus/client_python"
BUGTRACKER = "https://github.com/prometheus/client_python/issues"
SECTION = "devel/python"
# Apache-2.0, and a bundled copy of decorator 4.0.10 (prometheus_client/decorator.py) under the 2-clause BSD license.
LICENSE = "Apache-2.0 & BSD-2-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=86d3f3a95c324c9479bd8986968f4327 \
                    file://NOTICE;md5=4951b46e0743f84957d24051dcbdc0ae \
                    file://prometheus_client/decorator.py;beginline=1;endline=28;md5=82e1909dddf22b282a3ebb3a67c64bad"

# The sdist is named after the import package (prometheus_client-0.26.0.tar.gz), not the project.
PYPI_PACKAGE = "prometheus_client"
SRC_URI[sha256sum] = "04a91bcf94e2cf74a44a1a874d651a2e853ed354b6e822f3b7487751465d5c2b"

inherit pypi python_setuptools_build_meta

# What `import prometheus_client` loads at module level (exposition: wsgiref, socketserver, http.server, gzip, ssl;
# the multiprocess values: mmap; the parser: string); wsgiref and timeit are in python3-misc.
RDEPENDS:${PN} += "python3-compression python3-core python3-io python3-json python3-logging python3-misc \
                   python3-mmap python3-netclient python3-netserver python3-stringold"

CVE_PRODUCT = "prometheus_client"

BBCLASSEXTEND = "native nativesdk"
