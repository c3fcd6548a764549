# nooelint: oelint.var.mandatoryvar.HOMEPAGE, oelint.var.bbclassextend, oelint.var.suggestedvar.CVE_PRODUCT
# (a unit file of this layer: no upstream, no native variant)
SUMMARY = "Mounts the data partition of the edge image at /data"
DESCRIPTION = "A systemd mount unit for the partition labelled data (files/wic/edge-ab.wks) and the /data mount point, \
               which must exist in the read-only root file system. Installed by edge-image, not by \
               packagegroup-edge: the disk layout is the image's choice."
SECTION = "base"
LICENSE = "Apache-2.0"
# The unit is part of this layer, under the layer's license; oe-core ships that license's text.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://data.mount"

# A systemd unit and nothing else: without systemd the recipe is skipped, with this reason.
REQUIRED_DISTRO_FEATURES = "systemd"

inherit allarch features_check systemd

SYSTEMD_SERVICE:${PN} = "data.mount"

do_install() {
    install -d -m 0755 ${D}/data
    install -D -m 0644 ${UNPACKDIR}/data.mount ${D}${systemd_system_unitdir}/data.mount
}

FILES:${PN} += "/data"
