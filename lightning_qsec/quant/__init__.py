"""Functional quantization core: works on any ``nn.Module``, no Lightning needed."""

from lightning_qsec.quant.amplification import amplification_profile, error_amplification, error_amplification_ratio
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.checkpoint import load_quantized_checkpoint, safe_load
from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.convert import quantize_model
from lightning_qsec.quant.export import OnnxRuntimeModel, compare_deployed, export_onnx
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.quant.precision import at_precision, bit_widths, float_mode

__all__ = [
    "OnnxRuntimeModel",
    "compare_deployed",
    "export_onnx",
    "QuantConfig",
    "amplification_profile",
    "at_precision",
    "bit_widths",
    "calibrate",
    "error_amplification",
    "error_amplification_ratio",
    "float_mode",
    "is_quantized",
    "load_quantized_checkpoint",
    "quantize_model",
    "safe_load",
]
