"""lightning-qsec: quantization security for PyTorch Lightning.

Brevitas QAT and PTQ from Trainer callbacks, in-place precision sweeps, attacks and
defenses on the quantized model, and a security report per bit width.
"""

from lightning_qsec._warnings import filter_known_warnings

filter_known_warnings()

from lightning_qsec.batch import Batch, read_batch  # noqa: E402
from lightning_qsec.quant import (  # noqa: E402
    QuantConfig,
    at_precision,
    bit_widths,
    calibrate,
    export_onnx,
    float_mode,
    is_quantized,
    load_quantized_checkpoint,
    quantize_model,
    safe_load,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "QuantConfig",
    "__version__",
    "at_precision",
    "bit_widths",
    "calibrate",
    "export_onnx",
    "float_mode",
    "is_quantized",
    "load_quantized_checkpoint",
    "quantize_model",
    "read_batch",
    "safe_load",
]
