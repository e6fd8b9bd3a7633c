"""Functional robust accuracy: accuracy on adversarial inputs.

Example:
    >>> import torch
    >>> robust_accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    tensor(0.7500)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_qsec.metrics.functional._checks import check_same_length, check_target, safe_ratio, to_labels

__all__ = ["robust_accuracy"]


def _robust_accuracy_update(adv_preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Count correct adversarial predictions and samples in one batch.

    Returns:
        ``(correct, total)`` as 0-d integer tensors.
    """
    adv = to_labels(adv_preds, "adv_preds")
    target = check_target(target)
    check_same_length(adv_preds=adv, target=target)
    return (adv == target).sum(), torch.tensor(target.shape[0], device=target.device)


def _robust_accuracy_compute(correct: Tensor, total: Tensor) -> Tensor:
    """Robust accuracy from counts; ``nan`` when ``total`` is 0."""
    return safe_ratio(correct, total)


def robust_accuracy(adv_preds: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy of a model on adversarially perturbed inputs.

    All samples count, including those the model already misclassifies on clean
    inputs (the convention of RobustBench, Croce et al., 2021,
    https://arxiv.org/abs/2010.09670).

    Args:
        adv_preds: predictions on adversarial inputs, either integer class indices of
            shape ``(N,)`` or logits/probabilities of shape ``(N, C)`` (reduced with
            ``argmax`` over dim 1).
        target: true integer class indices of shape ``(N,)``.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (higher is better); ``nan`` when ``N == 0``.

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: if an argument has another shape or dtype, or if the arguments
            have different ``N``.

    Example:
        >>> import torch
        >>> adv_logits = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> robust_accuracy(adv_logits, torch.tensor([0, 1, 1, 1]))
        tensor(0.5000)
    """
    return _robust_accuracy_compute(*_robust_accuracy_update(adv_preds, target))
