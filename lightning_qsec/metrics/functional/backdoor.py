"""Functional backdoor metrics with BackdoorBench's definitions (Wu et al., NeurIPS 2022 Datasets
and Benchmarks, https://arxiv.org/abs/2206.12654).

* clean accuracy (C-Acc): accuracy on clean test samples, :func:`clean_accuracy`;
* attack success rate (ASR): triggered samples outside the target class classified as
  the target, :func:`~lightning_qsec.metrics.functional.attack_success_rate` with
  ``attack_target=``;
* defense effectiveness rate, :func:`defense_effectiveness_rate`:
  ``DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``,
  in ``[0, 1]``; 0.5 means no effect, 1 a defense that removes a 100 % backdoor at no
  accuracy cost.

Example:
    >>> import torch
    >>> clean_accuracy(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 2, 3]))
    tensor(0.7500)
    >>> defense_effectiveness_rate(asr_before=0.98, asr_after=0.02, acc_before=0.96, acc_after=0.95)
    tensor(0.9750)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_qsec.metrics.functional._checks import check_same_length, check_target, safe_ratio, to_labels

__all__ = ["clean_accuracy", "defense_effectiveness_rate"]


def _clean_accuracy_update(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(correct, total)`` as 0-d integer tensors."""
    labels = to_labels(preds, "preds")
    target = check_target(target)
    check_same_length(preds=labels, target=target)
    return (labels == target).sum(), torch.tensor(target.numel(), device=target.device)


def clean_accuracy(preds: Tensor, target: Tensor) -> Tensor:
    """BackdoorBench's clean accuracy: the share of clean samples classified correctly.

    Args:
        preds: predictions on clean inputs: class indices ``(N,)`` or scores ``(N, C)``.
        target: true class indices ``(N,)``.

    Returns:
        A 0-d float tensor in ``[0, 1]``; ``nan`` for ``N = 0``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a bad shape or dtype, or different ``N``.

    Example:
        >>> import torch
        >>> clean_accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    return safe_ratio(*_clean_accuracy_update(preds, target))


def _rate(value: float | Tensor, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"`{name}` must be a number in [0, 1], got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a finite number in [0, 1], got {value!r}")
    return float(value)


def defense_effectiveness_rate(
    *, asr_before: float | Tensor, asr_after: float | Tensor, acc_before: float | Tensor, acc_after: float | Tensor
) -> Tensor:
    """BackdoorBench's defense effectiveness rate.

    ``DER = [max(0, asr_before - asr_after) - max(0, acc_before - acc_after) + 1] / 2``:
    the fall of the attack success rate, minus the fall of clean accuracy, mapped to
    ``[0, 1]`` (0.5: no change; higher is better for the defender).

    Args:
        asr_before: attack success rate of the backdoored model, in ``[0, 1]``.
        asr_after: attack success rate after the defense, in ``[0, 1]``.
        acc_before: clean accuracy of the backdoored model, in ``[0, 1]``.
        acc_after: clean accuracy after the defense, in ``[0, 1]``.

    Returns:
        A 0-d float tensor in ``[0, 1]``.

    Raises:
        ValueError: an argument is not a finite number in ``[0, 1]`` (e.g. a ``nan`` ASR).

    Example:
        >>> defense_effectiveness_rate(asr_before=1.0, asr_after=0.0, acc_before=0.9, acc_after=0.95)
        tensor(1.)
    """
    asr_b, asr_a = _rate(asr_before, "asr_before"), _rate(asr_after, "asr_after")
    acc_b, acc_a = _rate(acc_before, "acc_before"), _rate(acc_after, "acc_after")
    return torch.tensor((max(0.0, asr_b - asr_a) - max(0.0, acc_b - acc_a) + 1) / 2)
