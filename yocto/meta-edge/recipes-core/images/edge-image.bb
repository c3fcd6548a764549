# nooelint: oelint.var.suggestedvar.CVE_PRODUCT, oelint.var.suggestedvar.SECTION
SUMMARY = "N3 Edge box: edge on a read-only root, A/B root slots, a /data partition"
DESCRIPTION = "A core image with systemd that runs the edge service. The root file system is read-only and laid \
               out twice (slots A and B, files/wic/edge-ab.wks) so that an update client can switch slots; the \
               service's state lives on the data partition, which root updates never touch."
LICENSE = "Apache-2.0"

# systemd runs the box (edge's unit, data.mount): with another init manager the image is skipped with this reason,
# instead of failing on a package that nothing provides.
REQUIRED_DISTRO_FEATURES = "systemd"

inherit core-image features_check

IMAGE_INSTALL = "packagegroup-core-boot packagegroup-edge edge-data-mount ${CORE_IMAGE_EXTRA_INSTALL}"
IMAGE_FEATURES += "read-only-rootfs"
IMAGE_LINGUAS = ""

# The A/B layout: boot, root A, root B, data. Both machines use it (README.md, "Disk layout"). From wrynose on, wic
# looks for kickstart files in this recipe's directory and in files/wic/ of every layer, no longer in <layer>/wic/.
IMAGE_FSTYPES += "wic wic.bmap"
WKS_FILE = "edge-ab.wks"
do_image_wic[depends] += "virtual/kernel:do_deploy"

# qemuarm64 has no boot firmware: runqemu loads the kernel itself, and the boot partition carries the kernel the
# way a board's would. Root is slot A, the second partition, mounted read-only as the image expects: runqemu appends
# " rw" to QB_KERNEL_ROOT unless it names ro or rw. 1 GiB of memory fits onnxruntime, numpy and the ptest.
IMAGE_BOOT_FILES:qemuarm64 = "${KERNEL_IMAGETYPE}"
QB_DEFAULT_FSTYPE:qemuarm64 = "wic"
QB_KERNEL_ROOT:qemuarm64 = "/dev/vda2 ro"
QB_MEM:qemuarm64 = "-m 1024"
