"""Argument checks shared by the attacks. Every error names the argument and what is allowed."""

from __future__ import annotations

import math
from typing import Any, get_args

import torch
from torch import Tensor

from lightning_qsec.attacks._context import Norm

NORMS: tuple[str, ...] = get_args(Norm)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_norm(norm: Any) -> Norm:
    """``norm`` if it is ``"linf"`` or ``"l2"``, else a ``ValueError``."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}")
    return norm  # type: ignore[return-value]


def check_domain(clip_min: Any, clip_max: Any) -> tuple[float, float]:
    """The input domain ``[clip_min, clip_max]``: finite numbers with ``clip_min < clip_max``."""
    for name, value in (("clip_min", clip_min), ("clip_max", clip_max)):
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not clip_min < clip_max:
        raise ValueError(f"clip_min must be smaller than clip_max, got clip_min={clip_min!r}, clip_max={clip_max!r}")
    return float(clip_min), float(clip_max)


def max_eps(norm: Norm, inputs: Tensor, clip_min: float, clip_max: float) -> float:
    """The largest meaningful radius: the diameter of the input domain in ``norm``."""
    width = clip_max - clip_min
    if norm == "linf":
        return width
    features = inputs[0].numel() if inputs.ndim > 0 and inputs.shape[0] > 0 else 1
    return width * math.sqrt(max(features, 1))


def check_eps(eps: Any, norm: Norm, inputs: Tensor, clip_min: float, clip_max: float) -> float:
    """``eps`` as a float in ``[0, diameter of the domain]``, else a ``ValueError``."""
    upper = max_eps(norm, inputs, clip_min, clip_max)
    what = "clip_max - clip_min" if norm == "linf" else "(clip_max - clip_min) * sqrt(features per sample)"
    if not _is_number(eps) or not math.isfinite(eps) or not 0.0 <= eps <= upper:
        raise ValueError(
            f"eps must be a finite number in [0, {upper:g}] for norm={norm!r} (the upper bound is "
            f"{what}, the largest distance inside the input domain), got {eps!r}"
        )
    return float(eps)


def check_step_size(value: Any, name: str = "alpha") -> float:
    """``value`` as a finite float ``> 0``, else a ``ValueError`` naming ``name``."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(value: Any, name: str) -> float:
    """``value`` as a finite float ``>= 0``, else a ``ValueError`` naming ``name``."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_count(value: Any, name: str) -> int:
    """``value`` if it is an integer ``>= 1``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_batch(inputs: Any, targets: Any, clip_min: float, clip_max: float) -> None:
    """Check ``inputs`` ``(N, ...)`` (floating point, no NaN, inside the domain) and ``targets`` ``(N,)``."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if inputs.ndim < 1 or not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be a floating-point tensor of shape (N, ...), got shape {tuple(inputs.shape)} "
            f"and dtype {inputs.dtype}"
        )
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer class indices of shape (N,), got shape {tuple(targets.shape)} "
            f"and dtype {targets.dtype}"
        )
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"inputs and targets must have the same number of samples N, got {inputs.shape[0]} inputs "
            f"and {targets.shape[0]} targets"
        )
    if targets.device != inputs.device:
        raise ValueError(f"inputs and targets must be on the same device, got {inputs.device} and {targets.device}")
    if inputs.numel() == 0:
        return
    values = inputs.detach()
    if torch.isnan(values).any():
        raise ValueError("inputs contain NaN")
    low, high = float(values.min()), float(values.max())
    if low < clip_min or high > clip_max:
        raise ValueError(
            f"inputs must lie in the input domain [clip_min, clip_max] = [{clip_min:g}, {clip_max:g}], "
            f"got values in [{low:g}, {high:g}]; pass the domain of your (e.g. normalised) inputs as "
            "clip_min/clip_max"
        )


def check_generator(generator: Any, inputs: Tensor) -> torch.Generator | None:
    """``generator`` if it is ``None`` or a ``torch.Generator`` on the device of ``inputs``."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != inputs.device.type:
        raise ValueError(
            f"generator must be on the device of inputs ({inputs.device.type}), got one on {generator.device.type}"
        )
    return generator
