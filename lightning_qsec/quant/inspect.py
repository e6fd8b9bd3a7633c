"""Find the Brevitas pieces inside a model: quantized layers, bit-width holders, stat scalers."""

from __future__ import annotations

from collections.abc import Iterator

from brevitas.core.bit_width import BitWidthStatefulConst
from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling
from brevitas.nn.quant_layer import QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjector
from torch import nn

QUANT_LAYER_TYPES = (QuantWeightBiasInputOutputLayer, QuantNonLinearActLayer)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` contains any Brevitas quantized layer."""
    return any(isinstance(m, QUANT_LAYER_TYPES) for m in model.modules())


def bit_width_holders(
    model: nn.Module, kind: str, *, adjustable_only: bool = False
) -> Iterator[tuple[str, BitWidthStatefulConst]]:
    """Yield ``(name, holder)`` for every stateful bit width of ``kind`` ("weight" or "act").

    ``adjustable_only`` leaves out a fixed input width (``QuantConfig.input_bit_width``).
    """
    proxy_type = WeightQuantProxyFromInjector if kind == "weight" else ActQuantProxyFromInjector
    for name, proxy in model.named_modules():
        if adjustable_only and getattr(proxy, "qsec_fixed_bit_width", False):
            continue
        if isinstance(proxy, proxy_type):
            for sub_name, holder in proxy.named_modules():
                if isinstance(holder, BitWidthStatefulConst):
                    yield f"{name}.{sub_name}", holder


def stat_scalers(model: nn.Module) -> Iterator[tuple[str, ParameterFromRuntimeStatsScaling]]:
    """Yield ``(name, scaler)`` for every activation scale learned from runtime statistics."""
    for name, module in model.named_modules():
        if isinstance(module, ParameterFromRuntimeStatsScaling):
            yield name, module
