"""Functional demographic parity difference and ratio (binary classification).

The selection rate of a group is the fraction of its samples predicted positive
(label 1). As in fairlearn (``method="between_groups"``), the difference is the
largest minus the smallest group selection rate and the ratio the smallest over the
largest.

Example:
    >>> import torch
    >>> preds = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0])
    >>> target = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1])
    >>> groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> demographic_parity_difference(preds, target, groups)  # 3/4 vs 0/4 selected
    tensor(0.7500)
    >>> demographic_parity_ratio(preds, target, groups)
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
    spread,
)

__all__ = ["demographic_parity_difference", "demographic_parity_ratio", "selection_rate"]


def _demographic_parity_update(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int, owner: str
) -> tuple[Tensor, Tensor]:
    """Per-group ``(selected, total)`` counts of one batch, each ``(num_groups,)`` int64."""
    labels, _, groups = read_inputs(preds, target, groups, num_groups, binary=owner)
    return group_sum(labels == 1, groups, num_groups), group_count(groups, num_groups)


def _selection_rate_from_counts(selected: Tensor, total: Tensor) -> Tensor:
    """Per-group selection rates ``(..., G)`` in float64."""
    return ratio(selected, total)


def _demographic_parity_difference_from_counts(selected: Tensor, total: Tensor) -> Tensor:
    """``max - min`` of the group selection rates, over the last dimension."""
    return spread(_selection_rate_from_counts(selected, total))


def _demographic_parity_ratio_from_counts(selected: Tensor, total: Tensor) -> Tensor:
    """``min / max`` of the group selection rates; ``nan`` when no group selects anyone (0/0)."""
    rates = _selection_rate_from_counts(selected, total)
    return ratio(rates.amin(-1), rates.amax(-1))


def _counts(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None, owner: str) -> tuple[Tensor, Tensor]:
    if num_groups is not None:
        check_num_groups(num_groups, owner)
    else:
        read_inputs(preds, target, groups, None, binary=owner)
        num_groups = infer_num_groups(groups)
    selected, total = _demographic_parity_update(preds, target, groups, num_groups, owner)
    check_group_counts(total, owner)
    return selected, total


def selection_rate(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None) -> Tensor:
    """Per-group selection rate ``P(pred = 1 | group)``, a float tensor ``(G,)``.

    Arguments and errors as in :func:`demographic_parity_difference`.
    """
    return as_result(_selection_rate_from_counts(*_counts(preds, target, groups, num_groups, "selection_rate")))


def demographic_parity_difference(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None
) -> Tensor:
    """Largest minus smallest group selection rate (0 is parity).

    Equals ``fairlearn.metrics.demographic_parity_difference(target, preds,
    sensitive_features=groups, method="between_groups")``.

    Args:
        preds: predicted labels 0/1 ``(N,)`` or binary logits/probabilities ``(N, 2)``.
        target: true labels 0/1 ``(N,)`` (checked, not used by the rate).
        groups: integer group labels ``0..G-1``, shape ``(N,)``.
        num_groups: ``G``; default ``max(groups) + 1``.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (lower is fairer).

    Raises:
        ValueError: on non-binary predictions or targets, a bad shape or dtype, a
            ``num_groups`` that is not an integer >= 1, a group label outside ``0..G-1``,
            empty inputs, a group without samples or a group with a single sample.
    """
    owner = "demographic_parity_difference"
    return as_result(_demographic_parity_difference_from_counts(*_counts(preds, target, groups, num_groups, owner)))


def demographic_parity_ratio(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None) -> Tensor:
    """Smallest over largest group selection rate (1 is parity); ``nan`` if no group selects anyone.

    Equals ``fairlearn.metrics.demographic_parity_ratio(..., method="between_groups")``.
    Arguments and errors as in :func:`demographic_parity_difference`.
    """
    owner = "demographic_parity_ratio"
    return as_result(_demographic_parity_ratio_from_counts(*_counts(preds, target, groups, num_groups, owner)))
