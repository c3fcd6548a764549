"""V4L2 camera capture (``source.kind = "v4l2"``): the kernel ABI (``_abi``), format negotiation and dropped-frame
accounting (sans-IO: ``negotiate``, ``sequence``), the device with its mmap ring (``device``), and the source that
feeds the pipeline and reopens an unplugged camera (``source``)."""
