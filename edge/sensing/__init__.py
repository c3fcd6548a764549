"""Sensor input: the values sources produce and the sources themselves.

- ``frames``: ``Frame`` (camera-like, any pixel format and row stride) and ``Reading`` (a scalar sensor value);
- ``sources``: the ``Source`` protocol and the npz, directory and serial sources, chosen from the configuration;
- ``synthetic``: renders of the bundled held-out digits in every pixel format, with their labels;
- ``serial_protocol``: the sans-IO decoder of our COBS-framed serial protocol (docs/serial-protocol.md);
  ``serial_source``: pyserial at its edge.
"""
