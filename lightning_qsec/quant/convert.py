"""Swap float layers for Brevitas quantized layers, in place, copying the weights exactly."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from brevitas.nn import (
    QuantConv1d,
    QuantConv2d,
    QuantIdentity,
    QuantLinear,
    QuantReLU,
    QuantSigmoid,
    QuantTanh,
)
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from torch import Tensor, nn

from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.inspect import is_quantized

__all__ = ["quantize_model", "QuantClampHardtanh", "WEIGHT_LAYERS", "ACTIVATIONS"]


class QuantClampHardtanh(nn.Module):
    """``nn.Hardtanh`` in float, then a signed activation quantizer on its output.

    Brevitas' ``QuantHardTanh`` clamps inside its quantizer, so with a statistics-based
    scale the clamp follows the statistics of its *input* and is lost, and with
    quantization off (:func:`~lightning_qsec.quant.float_mode`) it disappears. Here the
    clamp is a float ``nn.Hardtanh`` that always runs and the quantizer (a
    ``QuantIdentity``) only sees its output.

    Example:
        >>> import torch
        >>> act = QuantClampHardtanh(-1.0, 1.0, bit_width=8)
        >>> bool(act(torch.tensor([-3.0, 0.5, 3.0])).abs().max() <= 1.0)
        True
    """

    def __init__(self, min_val: float, max_val: float, *, bit_width: int) -> None:
        super().__init__()
        self.clamp = nn.Hardtanh(min_val, max_val)
        self.quant = QuantIdentity(
            act_quant=Int8ActPerTensorFloat, bit_width=bit_width, bit_width_impl_type="stateful_const"
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.quant(self.clamp(x))


WEIGHT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}
ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.ReLU: QuantReLU,
    nn.Hardtanh: QuantClampHardtanh,
    nn.Sigmoid: QuantSigmoid,
    nn.Tanh: QuantTanh,
}
_LEFT_FLOAT_BY_DESIGN = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Softmax,
    nn.LogSoftmax,
)


def _weight_layer(
    module: nn.Module, bits: int, input_bits: int | None, per_channel: bool, *, fixed_input: bool = False
) -> nn.Module:
    quant_cls = WEIGHT_LAYERS[type(module)]
    kwargs: dict[str, Any] = {}
    if isinstance(module, nn.Linear):
        args: tuple[Any, ...] = (module.in_features, module.out_features)
    else:
        args = (module.in_channels, module.out_channels, module.kernel_size)
        kwargs.update(
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
        )
    if input_bits is not None:
        kwargs.update(
            input_quant=Int8ActPerTensorFloat,
            input_bit_width=input_bits,
            input_bit_width_impl_type="stateful_const",
        )
    layer = quant_cls(
        *args,
        bias=module.bias is not None,
        weight_quant=Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat,
        weight_bit_width=bits,
        weight_bit_width_impl_type="stateful_const",
        device=module.weight.device,
        dtype=module.weight.dtype,
        **kwargs,
    )
    result = layer.load_state_dict(module.state_dict(), strict=False)
    if result.unexpected_keys:  # pragma: no cover - guards a Brevitas layout change
        raise RuntimeError(f"could not copy {result.unexpected_keys} into {quant_cls.__name__}")
    for name, param in module.named_parameters(recurse=False):  # a frozen layer stays frozen
        layer.get_parameter(name).requires_grad_(param.requires_grad)
    if fixed_input:  # QuantConfig.input_bit_width: at_precision leaves this width alone
        layer.input_quant.qsec_fixed_bit_width = True
    return layer


def _activation(module: nn.Module, bits: int) -> nn.Module:
    if type(module) is nn.Hardtanh:
        return QuantClampHardtanh(module.min_val, module.max_val, bit_width=bits)
    quant_cls = ACTIVATIONS[type(module)]
    act_quant = Uint8ActPerTensorFloat if quant_cls in (QuantReLU, QuantSigmoid) else Int8ActPerTensorFloat
    return quant_cls(act_quant=act_quant, bit_width=bits, bit_width_impl_type="stateful_const")


def _match(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _check_globs(globs: Sequence[str], names: Sequence[str], argument: str) -> None:
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise ValueError(
                f"{argument} entry {glob!r} matches no quantizable module; "
                f"quantizable modules are {list(names)}"
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _leftover_float(model: nn.Module) -> list[str]:
    left = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or isinstance(module, _LEFT_FLOAT_BY_DESIGN):
            continue
        is_act = type(module).__module__ == "torch.nn.modules.activation"
        has_params = next(module.parameters(recurse=False), None) is not None
        if (is_act or has_params) and type(module) not in WEIGHT_LAYERS and type(module) not in ACTIVATIONS:
            if not type(module).__module__.startswith("brevitas"):
                left.append(f"{name} ({type(module).__name__})")
    return left


def quantize_model(
    model: nn.Module,
    *,
    weight_bit_width: int = 8,
    act_bit_width: int = 8,
    layer_bit_widths: Mapping[str, int] | None = None,
    skip: Sequence[str] = (),
    quantize_input: bool = True,
    per_channel: bool = False,
    input_bit_width: int | None = None,
) -> nn.Module:
    """Swap a model's float layers for Brevitas layers, in place.

    ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` become ``QuantConv1d``/``QuantConv2d``/
    ``QuantLinear`` with signed weight quantizers (max-abs scale, per tensor or per
    output channel); ``nn.ReLU``/``nn.Sigmoid`` become unsigned activation
    quantizers, ``nn.Hardtanh``/``nn.Tanh`` signed ones. Weights are copied exactly.
    Bit widths are stored as buffers (``stateful_const``), so a checkpoint records
    its precision and :func:`~lightning_qsec.quant.at_precision` can change them in
    place. Activation scales are learned, initialised from statistics of the first
    training steps or from :func:`~lightning_qsec.quant.calibrate`. Other leaf layers
    with parameters, and other activations, stay float with one warning that lists
    them; normalisation layers stay float silently (also in the exported graph:
    they are not folded into the quantized layers). ``forward`` is never wrapped.
    Activations applied through ``torch.nn.functional`` are not module calls and are
    not quantized.

    Args:
        model: the float model; changed in place and returned.
        weight_bit_width: default weight bit width, 2..16.
        act_bit_width: default activation (and input) bit width, 2..16.
        layer_bit_widths: module-name glob -> bit width for matching layers. Each glob
            must match a quantizable module.
        skip: module names or globs to leave in float.
        quantize_input: also quantize the input of the first conv/linear layer (in
            definition order), i.e. the model input in a sequential network.
        per_channel: per-output-channel weight scales.
        input_bit_width: a fixed bit width for that input quantizer, the data's own
            precision, which :func:`~lightning_qsec.quant.at_precision` does not change;
            ``None``: the first layer's activation width, changed like the others (see
            :class:`~lightning_qsec.quant.QuantConfig`).

    Returns:
        ``model`` itself. On a model that is already quantized nothing changes.

    Raises:
        ValueError: a bit width outside 2..16, a glob matching no quantizable module,
            or a model without conv/linear layers.

    Example:
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                      weight_bit_width=4, act_bit_width=4)
        >>> type(net[0]).__name__, type(net[1]).__name__
        ('QuantLinear', 'QuantReLU')
    """
    config = QuantConfig(
        weight_bit_width=weight_bit_width,
        act_bit_width=act_bit_width,
        layer_bit_widths=layer_bit_widths or {},
        skip=skip,
        quantize_input=quantize_input,
        per_channel=per_channel,
        input_bit_width=input_bit_width,
    )
    if is_quantized(model):
        return model
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if name and (type(m) in WEIGHT_LAYERS or type(m) in ACTIVATIONS)
    ]
    names = [name for name, _ in candidates]
    _check_globs(list(config.layer_bit_widths), names, "layer_bit_widths")
    _check_globs(list(config.skip), names, "skip")
    targets = [(n, m) for n, m in candidates if not _match(n, config.skip)]
    first = next((n for n, m in candidates if type(m) in WEIGHT_LAYERS), None)
    if config.input_bit_width is not None and first is not None and _match(first, config.skip):
        raise ValueError(
            f"input_bit_width={config.input_bit_width} fixes the precision of the model input, but the first "
            f"conv/linear layer {first!r} is in skip=, so no quantizer sees the input; drop input_bit_width "
            "or take that layer out of skip"
        )
    if not any(type(m) in WEIGHT_LAYERS for _, m in targets):
        raise ValueError(
            "model has no quantizable layers: quantize_model swaps "
            f"{[t.__name__ for t in WEIGHT_LAYERS]} (and activations {[t.__name__ for t in ACTIVATIONS]}), "
            f"found none outside skip={list(config.skip)} in {type(model).__name__}"
        )

    def bits_for(name: str, default: int) -> int:
        for glob, bits in config.layer_bit_widths.items():
            if fnmatch.fnmatchcase(name, glob):
                return bits
        return default

    device = next(model.parameters()).device
    first_weight_layer = True
    for name, module in targets:
        if type(module) in WEIGHT_LAYERS:
            bits = bits_for(name, config.weight_bit_width)
            input_bits = None
            if config.quantize_input and first_weight_layer:
                input_bits = config.input_bit_width or bits_for(name, config.act_bit_width)
            fixed = input_bits is not None and config.input_bit_width is not None
            new = _weight_layer(module, bits, input_bits, config.per_channel, fixed_input=fixed)
            first_weight_layer = False
        else:
            new = _activation(module, bits_for(name, config.act_bit_width))
        new.train(module.training)
        _set_submodule(model, name, new.to(device))
    left = _leftover_float(model)
    if left:
        warnings.warn(
            f"quantize_model left {len(left)} layer(s) in float (no quantized counterpart): {', '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    model.qsec_config = config.to_dict()  # type: ignore[assignment]
    return model
