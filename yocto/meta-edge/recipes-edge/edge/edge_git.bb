# nooelint: oelint.var.mandatoryvar.HOMEPAGE, oelint.var.bbclassextend
# (the project has no public home page yet, EDGE_GIT_URL names its repository; a service for the device has no
# native variant)
SUMMARY = "N3 Edge box service: sensor inference in C and ONNX, signed telemetry"
DESCRIPTION = "edge reads sensor frames, turns each into the model's input tensor in one pass of C code, runs a \
               quantized ONNX model with onnxruntime and emits one record per inference: JSON lines, or envelopes \
               signed with the box's Ed25519 key, kept in a durable SQLite outbox and published over MQTT 5 with \
               mutual TLS."
SECTION = "console/network"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=4e168cce331e5c827d4c2b68a6200e1b"

# A release builds the pinned SRCREV of the project's repository; EDGE_GIT_URL names it (set it to a mirror in
# local.conf). A development build uses the checkout that contains this layer instead, with externalsrc
# (README.md, "Building your checkout"); the kas files of this repository do that.
EDGE_GIT_URL ??= "git://git.n3-edge.invalid/edge/edge.git"
PV = "0.1.0+git"
SRC_URI = "${EDGE_GIT_URL};protocol=https;branch=main \
           file://edge.toml \
           file://edge-tmpfiles.conf \
           file://run-ptest \
           "
SRCREV = "beeaaec56156247e05f07d29d6f920e3386b64f7"

# The checkout this recipe lives in (yocto/meta-edge/recipes-edge/edge/ -> the repository root), for externalsrc.
EDGE_SRCTREE := "${@os.path.normpath(os.path.join(d.getVar('THISDIR'), '..', '..', '..', '..'))}"

# The service's state; the unit (ReadWritePaths), tmpfiles.d and the configuration name the same directory.
EDGE_DATADIR = "/data/edge"

# The subset of the project's tests that the box runs as its ptest: the code whose behaviour can differ on ARM (the
# C kernels and their NEON path, onnxruntime, SQLite, OpenSSL through cryptography) and needs no broker, database,
# OpenCV or onnx package. The files they import (conftest.py, mqtt_broker.py, preprocess_reference.py) come along.
EDGE_PTEST_FILES = "\
    test_config.py \
    test_cose.py \
    test_outbox.py \
    test_postprocess.py \
    test_preprocess.py \
    test_preprocess_errors.py \
    test_preprocess_properties.py \
    test_serial_protocol.py \
    test_synthetic.py \
    test_verifier.py \
"

# The service needs systemd, not merely a unit file: Type=notify with a watchdog, tmpfiles.d, RequiresMountsFor and
# its runtime tests use systemd-run. Without it in DISTRO_FEATURES the recipe is skipped, and says why.
REQUIRED_DISTRO_FEATURES = "systemd"

inherit features_check python_setuptools_build_meta systemd useradd ptest

# The wheel this builds is the distribution n3-edge (PyPI's "edge" is an unrelated project); the import package,
# the command, the unit and this recipe keep the name edge.
# vendor:product, so that CVE checks do not match other products called edge (a web browser among them).
CVE_PRODUCT = "n3:edge"

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system edge"
# A system user without a login; dialout lets it open serial sensor boards (/dev/ttyUSB*, /dev/ttyAMA*), video cameras.
USERADD_PARAM:${PN} = "--system --gid edge --groups dialout,video --home-dir ${EDGE_DATADIR} --no-create-home \
                       --shell ${base_sbindir}/nologin edge"

# edge-enroll.service enrolls the box at first boot from a claim file on the boot partition (docs/onboarding.md).
SYSTEMD_SERVICE:${PN} = "edge.service edge-enroll.service"

# edge-fleet: the fleet side (edge/fleet/: the gateway, its store, the CA, the TUF repository signer, rollouts) runs
# on the operator's servers, never on a box. It goes into its own package, which no image of this layer installs
# (tools/yocto/check.py checks both). Listed first so that its FILES claim edge/fleet before ${PN}'s do.
PACKAGES =+ "${PN}-fleet"
FILES:${PN}-fleet += "${PYTHON_SITEPACKAGES_DIR}/edge/fleet"

do_install:append() {
    # The unit is the one the package ships and tests/test_systemd.py verifies: installed from the source, never copied.
    install -D -m 0644 ${S}/edge/data/edge.service ${D}${systemd_system_unitdir}/edge.service
    install -D -m 0644 ${S}/edge/data/edge-enroll.service ${D}${systemd_system_unitdir}/edge-enroll.service
    install -D -m 0644 ${UNPACKDIR}/edge-tmpfiles.conf ${D}${nonarch_libdir}/tmpfiles.d/edge.conf
    install -D -m 0644 ${UNPACKDIR}/edge.toml ${D}${sysconfdir}/edge/edge.toml

    # The factory models live read-only under /usr/share/edge/models. The package's own copies become links to
    # them, so the package default (no [model] path) and the configured path are one file, stored once.
    install -d ${D}${datadir}/edge/models
    for model in ${D}${PYTHON_SITEPACKAGES_DIR}/edge/models/*.onnx; do
        name=$(basename "$model")
        install -m 0444 "$model" ${D}${datadir}/edge/models/"$name"
        ln -sf -r ${D}${datadir}/edge/models/"$name" "$model"
    done
}

do_install_ptest() {
    install -d ${D}${PTEST_PATH}/tests ${D}${PTEST_PATH}/docs ${D}${PTEST_PATH}/edge
    # pyproject.toml carries the pytest settings (markers, --strict-markers) and makes this directory the rootdir.
    install -m 0644 ${S}/pyproject.toml ${D}${PTEST_PATH}/
    for f in conftest.py mqtt_broker.py preprocess_reference.py ${EDGE_PTEST_FILES}; do
        install -m 0644 ${S}/tests/$f ${D}${PTEST_PATH}/tests/
    done
    install -m 0644 ${S}/docs/edge.example.toml ${D}${PTEST_PATH}/docs/
    # conftest.py's model fixtures look in <root>/edge/models: point it at the installed package's. A directory
    # without __init__.py never shadows the installed package, whatever sys.path holds.
    ln -s -r ${D}${PYTHON_SITEPACKAGES_DIR}/edge/models ${D}${PTEST_PATH}/edge/models
}

FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/edge.conf"
CONFFILES:${PN} = "${sysconfdir}/edge/edge.toml"

# What edge imports at run time: pyproject.toml's dependencies and the standard library modules that OE packages
# apart (tools/yocto/check.py keeps both lists in step with the code). onnxruntime comes from meta-onnxruntime.
RDEPENDS:${PN} += "\
    onnxruntime \
    python3-base58 \
    python3-cbor2 \
    python3-cobs \
    python3-compression \
    python3-core \
    python3-crypt \
    python3-cryptography \
    python3-ctypes \
    python3-datetime \
    python3-difflib \
    python3-io \
    python3-json \
    python3-logging \
    python3-math \
    python3-mmap \
    python3-netclient \
    python3-numbers \
    python3-numpy \
    python3-paho-mqtt \
    python3-pyserial \
    python3-securesystemslib \
    python3-sqlite3 \
    python3-threading \
    python3-tomllib \
    python3-tuf \
    python3-urllib3 \
"
# The fleet's own needs beyond the box's: Prometheus metrics (python3-prometheus-client, meta-python) served with
# /healthz through the standard library's wsgiref (python3-misc). Its
# PostgreSQL backend (psycopg) is optional and loads only for a postgresql:// store; SQLite is the default. QR labels
# of claim codes (segno) are optional too: `edge fleet claims create --qr` says what to install.
RDEPENDS:${PN}-fleet += "\
    ${PN} \
    python3-misc \
    python3-prometheus-client \
"
RDEPENDS:${PN}-ptest += "\
    ${PN} \
    python3-hypothesis \
    python3-pytest \
    python3-unittest-automake-output \
"
