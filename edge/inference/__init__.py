"""Inference on the box.

- ``preprocess``: the C kernels (``edge._native``: pixel-format conversion, resize, normalisation, layout, int8 in one
  pass) and the choice of backend; ``_preprocess_numpy``: their numpy twin, used where the extension is missing and
  by every test beside it;
- ``model``: the onnxruntime wrapper that reads the input spec and preprocessing from the model file;
  ``_onnx_graph``: a bounded reader of the ONNX protobuf for what onnxruntime does not expose;
- ``postprocess``: top-k and scores; ``quantize``: static int8 quantization (``edge model quantize``, a workstation
  command: it imports onnx lazily).
"""
