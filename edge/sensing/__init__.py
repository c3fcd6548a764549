"""Sensor input: frame sources, the serial sensor protocol, and the frame and reading types."""
