"""The deployer's weight arithmetic, outside Brevitas: max-abs scales and integer grids.

Brevitas' default signed weight quantizers (``Int8WeightPerTensorFloat`` and
``Int8WeightPerChannelFloat`` at any bit width) take the scale ``max|w| / qmax`` per
tensor or per output channel, with ``qmax = 2 ** (bits - 1) - 1`` (narrow range), and
round to nearest. The red team attacks exactly this grid and the backdoor repair
re-chooses roundings on it, so both compute it here in plain torch.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_qsec.quant.convert import WEIGHT_LAYERS

__all__ = [
    "WEIGHT_QUANTIZERS",
    "WeightQuantizer",
    "check_weight_quantizer",
    "fake_quantize",
    "integer_grid",
    "max_abs",
    "weight_layers",
]

WeightQuantizer = Literal["per_tensor", "per_channel"]
WEIGHT_QUANTIZERS: tuple[str, ...] = get_args(WeightQuantizer)
_TINY = torch.finfo(torch.float32).tiny


def check_weight_quantizer(quantizer: Any) -> WeightQuantizer:
    """Return ``quantizer`` if it is ``"per_tensor"`` or ``"per_channel"``, else raise ``ValueError``."""
    if quantizer not in WEIGHT_QUANTIZERS:
        allowed = ", ".join(repr(q) for q in WEIGHT_QUANTIZERS)
        raise ValueError(f"quantizer must be one of {allowed}, got {quantizer!r}")
    return quantizer  # type: ignore[no-any-return]


def max_abs(weight: Tensor, per_channel: bool) -> Tensor:
    """Max-abs statistic: per tensor (0-d), or per output channel (shaped to broadcast)."""
    if per_channel:
        return weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True)
    return weight.abs().max()


def integer_grid(weight: Tensor, bits: int, per_channel: bool) -> tuple[Tensor, Tensor, int]:
    """``(scale, integer weights, qmax)`` as Brevitas' max-abs signed narrow-range quantizer computes them."""
    qmax = 2 ** (bits - 1) - 1
    scale = (max_abs(weight, per_channel) / qmax).clamp_min(_TINY)
    return scale, torch.clamp(torch.round(weight / scale), -qmax, qmax), qmax


def fake_quantize(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Quantize-dequantize on :func:`integer_grid` with a straight-through gradient."""
    scale, integers, _ = integer_grid(weight, bits, per_channel)
    return weight + (integers * scale - weight).detach()


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers :func:`~lightning_qsec.quantize_model` swaps (exact types), in module order."""
    return [(name, m) for name, m in model.named_modules() if type(m) in WEIGHT_LAYERS]
