# nooelint: oelint.var.suggestedvar.SECTION
SUMMARY = "The edge service and what a box needs to run it"
DESCRIPTION = "Installs the edge service (its unit, user, configuration and factory model). It knows nothing of \
               the disk layout: an image that installs it must mount the data partition at /data, as edge-image \
               does with edge-data-mount."
LICENSE = "Apache-2.0"

# edge is a systemd service: so is what installs it (a non-systemd distro skips both, with the reason, instead of
# failing on a package that nothing provides).
REQUIRED_DISTRO_FEATURES = "systemd"

inherit features_check packagegroup

RDEPENDS:${PN} = "edge"
