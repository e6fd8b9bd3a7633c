"""Change a quantized model's precision in place, or switch quantization off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from brevitas.graph.calibrate import quantization_status_manager
from torch import nn

from lightning_qsec._validation import check_bit_width
from lightning_qsec.quant.inspect import bit_width_holders, is_quantized

__all__ = ["at_precision", "float_mode", "bit_widths", "require_quantized"]


def require_quantized(model: nn.Module, argument: str = "model") -> None:
    """Raise ``ValueError`` unless ``model`` holds Brevitas layers."""
    if not is_quantized(model):
        raise ValueError(
            f"{argument} has no quantized layers; call lightning_qsec.quantize_model({argument}) "
            "or train it with the QuantizationAwareTraining callback first"
        )


def require_float(model: nn.Module, needs: str, argument: str = "model") -> None:
    """Raise ``ValueError`` if ``model`` already holds Brevitas layers; ``needs`` says why a float one is needed."""
    if is_quantized(model):
        raise ValueError(f"{argument} is already quantized; {needs}")


def bit_widths(model: nn.Module, *, adjustable_only: bool = False) -> dict[str, dict[str, int]]:
    """Current bit widths: ``{"weight": {name: bits}, "act": {name: bits}}``.

    ``adjustable_only`` leaves out a fixed input width (``QuantConfig.input_bit_width``),
    which :func:`at_precision` does not change.
    """
    return {
        kind: {
            name: int(holder.bit_width.item())
            for name, holder in bit_width_holders(model, kind, adjustable_only=adjustable_only)
        }
        for kind in ("weight", "act")
    }


@contextmanager
def at_precision(
    model: nn.Module,
    *,
    weight_bit_width: int | None = None,
    act_bit_width: int | None = None,
) -> Iterator[nn.Module]:
    """Run a quantized model at other bit widths, in place, and restore them on exit.

    No copy is made: the stored bit widths (``stateful_const`` buffers) are overwritten
    and scales follow at run time, since Brevitas derives an integer scale from the
    bit width on every forward pass. Mixed per-layer widths are overwritten uniformly
    and restored exactly. A fixed input width (``QuantConfig.input_bit_width``) is
    the data's precision and is left as it is.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quant.quantize_model`.
        weight_bit_width: bit width for every weight quantizer, 2..16; ``None`` keeps them.
        act_bit_width: bit width for every activation/input quantizer, 2..16, except a fixed
            input width (``QuantConfig.input_bit_width``); ``None`` keeps them.

    Yields:
        ``model``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model, at_precision
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 2), nn.ReLU()), weight_bit_width=8).eval()
        >>> with at_precision(net, weight_bit_width=2, act_bit_width=4):
        ...     y = net(torch.randn(3, 4))
    """
    require_quantized(model)
    requested = {}
    if weight_bit_width is not None:
        requested["weight"] = check_bit_width(weight_bit_width, "weight_bit_width")
    if act_bit_width is not None:
        requested["act"] = check_bit_width(act_bit_width, "act_bit_width")
    saved = []
    try:
        for kind, bits in requested.items():
            for _, holder in bit_width_holders(model, kind, adjustable_only=True):
                saved.append((holder, holder.bit_width.detach().clone()))
                holder.bit_width.data.fill_(float(bits))
        yield model
    finally:
        for holder, value in saved:
            holder.bit_width.data.copy_(value)


@contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every weight, bias and activation quantizer off, in place, and back on at exit.

    The float model is the one the quantized model simulates: same weights, no rounding.
    Activation statistics are not touched, and every submodule's train/eval flag is as it
    was, on entry and at exit (Brevitas' status manager sets its quantizers to the
    model's flag, which would unfreeze a block kept in eval mode).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model, float_mode
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 2))).eval()
        >>> with float_mode(net):
        ...     y = net(torch.randn(3, 4))
    """
    require_quantized(model)
    flags = {m: m.training for m in model.modules()}
    try:
        with quantization_status_manager(
            model, disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True
        ):
            for module, training in flags.items():
                module.training = training
            yield model
    finally:
        for module, training in flags.items():
            module.training = training
