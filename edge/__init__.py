"""edge: the firmware service of N3 Edge boxes.

A box reads sensor frames, preprocesses them in C (``edge.inference.preprocess``), runs a quantized ONNX model
(``edge.inference.model``) and emits one record per inference (``edge.service``).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
