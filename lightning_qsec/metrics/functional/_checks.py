"""Input checks shared by the lightning-qsec metrics (private).

Every metric accepts predictions either as integer class indices of shape
``(N,)`` or as logits/probabilities of shape ``(N, C)`` with ``C >= 2`` (reduced
with an argmax over dim 1), and targets as integer class indices of shape ``(N,)``.
A single score column ``(N, 1)`` is rejected: its argmax would always be class 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDS_SHAPES = "integer class indices of shape (N,) or logits/probabilities of shape (N, C)"


def _describe(x: Tensor) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def _is_integer(x: Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def to_labels(preds: Tensor, name: str) -> Tensor:
    """Predicted class indices ``(N,)`` from indices ``(N,)`` or scores ``(N, C)``.

    Raises:
        TypeError: if ``preds`` is not a tensor.
        ValueError: if ``preds`` has another shape or dtype, or ``C < 2``; the message names ``name``.
    """
    preds = _check_tensor(preds, name)
    if preds.ndim == 1:
        if not _is_integer(preds):
            raise ValueError(
                f"`{name}` must be {PREDS_SHAPES}; a 1-D `{name}` is read as class indices and "
                f"must have an integer dtype, got {_describe(preds)}"
            )
        return preds
    if preds.ndim == 2:
        if preds.shape[1] < 2:
            binary = (
                f"; a single score column is a binary model's: pass its class indices, e.g. "
                f"`({name} > 0).long()` for a logit, or two-column logits"
                if preds.shape[1] == 1
                else ""
            )
            raise ValueError(f"`{name}` must be {PREDS_SHAPES} with C >= 2, got {_describe(preds)}{binary}")
        if preds.dtype == torch.bool or preds.is_complex():
            raise ValueError(f"`{name}` must be {PREDS_SHAPES} with a real dtype, got {_describe(preds)}")
        return preds.argmax(dim=1)
    raise ValueError(f"`{name}` must be {PREDS_SHAPES}, got {_describe(preds)}")


def check_target(target: Tensor, name: str = "target") -> Tensor:
    """Check that ``target`` is a 1-D integer tensor of class indices."""
    target = _check_tensor(target, name)
    if target.ndim != 1 or not _is_integer(target):
        raise ValueError(f"`{name}` must be integer class indices of shape (N,), got {_describe(target)}")
    return target


def check_same_length(**tensors: Tensor) -> None:
    """Check that all the given tensors have the same first dimension ``N``."""
    lengths = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"`{name}` has N={n}" for name, n in lengths.items())
        raise ValueError(f"All inputs must have the same number of samples N: {listing}")


def check_same_num_classes(**tensors: Tensor) -> None:
    """Check that the given ``(N, C)`` score tensors agree on ``C`` (1-D ones are skipped)."""
    classes = {name: t.shape[1] for name, t in tensors.items() if isinstance(t, Tensor) and t.ndim == 2}
    if len(set(classes.values())) > 1:
        listing = ", ".join(f"`{name}` has C={c}" for name, c in classes.items())
        raise ValueError(f"Logits/probabilities must have the same number of classes C: {listing}")


def safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` as a float tensor; ``nan`` where the denominator is 0."""
    num = numerator.to(torch.get_default_dtype())
    den = denominator.to(torch.get_default_dtype())
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))
