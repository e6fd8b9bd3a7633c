"""The float twin of a quantized model as a module of its own, sharing every weight."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.quant.precision import float_mode, require_quantized

__all__ = ["FloatView"]


class FloatView(nn.Module):
    """Call a quantized model with quantization off: the float model it simulates.

    A view, not a copy: the wrapped model is a submodule, so weights, buffers and
    train/eval flags are shared. Each call runs the model inside
    :func:`~lightning_qsec.float_mode` (weights, biases, inputs and activations not
    quantized; activation statistics not touched), and quantization is back on when
    the call returns. Use it to attack or evaluate the float side of a model whose float
    and quantized versions are the same module in two modes.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quantize_model`.

    Raises:
        ValueError: ``model`` has no quantized layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model
        >>> from lightning_qsec.attacks import FloatView, pgd
        >>> net = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))).eval()
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> x_float_adv = pgd(FloatView(net), x, y, eps=0.1, alpha=0.02, steps=5)
    """

    def __init__(self, model: nn.Module) -> None:
        require_quantized(model)
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with float_mode(self.model):
            return self.model(*args, **kwargs)


def float_side(float_model: nn.Module, quant_model: nn.Module) -> nn.Module:
    """``float_model``, or ``FloatView(quant_model)`` when both are the same object."""
    if float_model is not quant_model:
        return float_model
    if not is_quantized(quant_model):
        raise ValueError(
            "float_model and quant_model are the same module, so its float mode would serve as the float "
            "model, but quant_model has no quantized layers: quantize it with lightning_qsec.quantize_model "
            "or pass a separate float model"
        )
    return FloatView(quant_model)
