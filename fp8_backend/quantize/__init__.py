"""FP8 checkpoint producer: 16-bit safetensors model → AutoFP8 or compressed-tensors FP8 checkpoint.

No vLLM import. Modules: options (validated user choices), weights (numerics.py quantization and
the MSE scale search), calibration + corpus (activation ranges via transformers hooks), layers
(which modules are linear / attention), experts (mixture-of-experts layers stored per expert,
their routers), shards
(streaming safetensors I/O), output (all-or-nothing output directory), api (the pipeline).
Tensor names, scale shapes and the quantization_config come from fp8_backend.formats.writer.
"""

from .api import QuantizeReport, quantize
from .options import FORMATS, SCHEMES, QuantizeError, QuantizeOptions

__all__ = ["quantize", "QuantizeReport", "QuantizeOptions", "QuantizeError", "SCHEMES", "FORMATS"]
