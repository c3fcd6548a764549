"""The bounds of what a model may be on the box, stated once and apart from numpy and onnxruntime.

``edge.inference.model`` enforces them; the configuration (``[ota] max_model_mb``) and the quantizer read them, and
``edge --help`` loads the configuration's module, which must not pull in numpy to answer.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_MODEL_BYTES", "MAX_OUTPUT_VALUES", "MAX_TENSOR_BYTES"]

# The largest model file the box reads: it is held in memory whole while onnxruntime builds its session from it.
# A protobuf message cannot exceed 2 GiB anyway; an edge model is a few MB (MobileNetV2 fp32: 14 MB).
MAX_MODEL_BYTES: Final = 2**30
# The largest input tensor a model may declare: the box allocates its input buffer at load and the preprocessor
# fills one per frame. A 1 x 3 x 2048 x 2048 float32 input is 48 MiB.
MAX_TENSOR_BYTES: Final = 64 * 2**20
# The first output is read as one vector of class scores (top-k, one label each) and bound to a buffer allocated at
# load: more classes than this is not a classifier, and their fallback labels alone would take hundreds of MB.
MAX_OUTPUT_VALUES: Final = 1 << 20
