"""Functional per-group accuracy and worst-group accuracy.

Example:
    >>> import torch
    >>> preds = torch.tensor([1, 0, 1, 1, 0, 0])
    >>> target = torch.tensor([1, 0, 0, 1, 1, 0])
    >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
    >>> group_accuracy(preds, target, groups)
    tensor([0.6667, 0.6667])
    >>> worst_group_accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 0]), torch.tensor([0, 0, 1, 1]))
    tensor(0.)
"""

from __future__ import annotations

from torch import Tensor

from lightning_qsec.metrics.functional._groups import (
    as_result,
    check_group_counts,
    check_num_groups,
    group_count,
    group_sum,
    infer_num_groups,
    ratio,
    read_inputs,
)

__all__ = ["group_accuracy", "worst_group_accuracy"]


def _group_accuracy_update(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group ``(correct, total)`` counts of one batch, each ``(num_groups,)`` int64."""
    labels, target, groups = read_inputs(preds, target, groups, num_groups, binary=None)
    return group_sum(labels == target, groups, num_groups), group_count(groups, num_groups)


def _group_accuracy_from_counts(correct: Tensor, total: Tensor) -> Tensor:
    """Per-group accuracy ``(..., G)`` in float64; ``nan`` for an empty group."""
    return ratio(correct, total)


def _inputs(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None, owner: str) -> Tensor:
    if num_groups is not None:
        check_num_groups(num_groups, owner)
    else:
        read_inputs(preds, target, groups, None, binary=None)
        num_groups = infer_num_groups(groups)
    correct, total = _group_accuracy_update(preds, target, groups, num_groups)
    check_group_counts(total, owner)
    return _group_accuracy_from_counts(correct, total)


def group_accuracy(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None) -> Tensor:
    """Accuracy within each sensitive group.

    Equals fairlearn's ``MetricFrame(metrics=accuracy_score, ...).by_group``.

    Args:
        preds: predicted class indices ``(N,)`` or logits/probabilities ``(N, C)`` (argmax
            over dim 1). Any number of classes.
        target: true class indices ``(N,)``.
        groups: integer group labels ``0..G-1``, shape ``(N,)``.
        num_groups: ``G``; default ``max(groups) + 1``.

    Returns:
        A float tensor ``(G,)``: the accuracy of group ``g`` at index ``g``.

    Raises:
        ValueError: on a bad shape or dtype, a ``num_groups`` that is not an integer >= 1,
            a group label outside ``0..G-1``, empty inputs, a group without samples or a
            group with a single sample.
    """
    return as_result(_inputs(preds, target, groups, num_groups, "group_accuracy"))


def worst_group_accuracy(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None) -> Tensor:
    """The lowest per-group accuracy (fairlearn: ``MetricFrame(accuracy_score).group_min()``).

    Arguments and errors as in :func:`group_accuracy`; returns a 0-d float tensor.
    """
    return as_result(_inputs(preds, target, groups, num_groups, "worst_group_accuracy").amin(-1))
