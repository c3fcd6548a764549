"""Inference on the box: preprocessing (C with a numpy twin), the onnxruntime model wrapper, postprocessing."""
