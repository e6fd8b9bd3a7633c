"""Functional equalized odds difference and equal opportunity difference (binary classification).

Per group, the true positive rate is ``P(pred = 1 | target = 1)`` and the false
positive rate ``P(pred = 1 | target = 0)``. As in fairlearn (``method="between_groups"``,
``agg="worst_case"``), the equal opportunity difference is the largest minus the
smallest group TPR, and the equalized odds difference the larger of that TPR
difference and the same difference of FPRs.

A group without positive targets (or, for equalized odds, without negative targets)
has no TPR (FPR): fairlearn reports 0 for it, which silently hides the gap; here it is
an error.

Example:
    >>> import torch
    >>> preds = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0])
    >>> target = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0])
    >>> groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> equal_opportunity_difference(preds, target, groups)  # TPR 1.0 vs 0.5
    tensor(0.5000)
    >>> equalized_odds_difference(preds, target, groups)  # FPR 0.0 vs 0.5, TPR 1.0 vs 0.5
    tensor(0.5000)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_qsec.metrics.functional._groups import (
    as_result,
    check_group_counts,
    check_num_groups,
    check_rate_denominators,
    group_sum,
    infer_num_groups,
    ratio,
    read_inputs,
    spread,
)

__all__ = ["equal_opportunity_difference", "equalized_odds_difference"]


def _rates_update(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int, owner: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-group ``(true_pos, pos, false_pos, neg)`` counts of one batch, each ``(num_groups,)`` int64."""
    labels, target, groups = read_inputs(preds, target, groups, num_groups, binary=owner)
    pos, selected = target == 1, labels == 1
    return (
        group_sum(selected & pos, groups, num_groups),
        group_sum(pos, groups, num_groups),
        group_sum(selected & ~pos, groups, num_groups),
        group_sum(~pos, groups, num_groups),
    )


def _check_rates(pos: Tensor, neg: Tensor, owner: str, *, need_fpr: bool) -> None:
    check_group_counts(pos + neg, owner)
    check_rate_denominators(pos, owner, "target 1 (positives; the true positive rate)")
    if need_fpr:
        check_rate_denominators(neg, owner, "target 0 (negatives; the false positive rate)")


def _equal_opportunity_difference_from_counts(tp: Tensor, pos: Tensor) -> Tensor:
    """``max - min`` of the group TPRs over the last dimension (float64)."""
    return spread(ratio(tp, pos))


def _equalized_odds_difference_from_counts(tp: Tensor, pos: Tensor, fp: Tensor, neg: Tensor) -> Tensor:
    """The larger of the TPR and FPR spreads over the last dimension (float64; ``nan`` propagates)."""
    return torch.maximum(spread(ratio(tp, pos)), spread(ratio(fp, neg)))


def _counts(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None, owner: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if num_groups is not None:
        check_num_groups(num_groups, owner)
    else:
        read_inputs(preds, target, groups, None, binary=owner)
        num_groups = infer_num_groups(groups)
    return _rates_update(preds, target, groups, num_groups, owner)


def equal_opportunity_difference(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None
) -> Tensor:
    """Largest minus smallest group true positive rate (0 is equal opportunity).

    Equals ``fairlearn.metrics.equal_opportunity_difference(target, preds,
    sensitive_features=groups, method="between_groups")``.

    Args:
        preds: predicted labels 0/1 ``(N,)`` or binary logits/probabilities ``(N, 2)``.
        target: true labels 0/1 ``(N,)``.
        groups: integer group labels ``0..G-1``, shape ``(N,)``.
        num_groups: ``G``; default ``max(groups) + 1``.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (lower is fairer).

    Raises:
        ValueError: on non-binary predictions or targets, a bad shape or dtype, a
            ``num_groups`` that is not an integer >= 1, a group label outside ``0..G-1``,
            empty inputs, a group without samples, with a single sample or without
            positive targets.
    """
    owner = "equal_opportunity_difference"
    tp, pos, _, neg = _counts(preds, target, groups, num_groups, owner)
    _check_rates(pos, neg, owner, need_fpr=False)
    return as_result(_equal_opportunity_difference_from_counts(tp, pos))


def equalized_odds_difference(preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None) -> Tensor:
    """The larger of the group TPR difference and the group FPR difference (0 is equalized odds).

    Equals ``fairlearn.metrics.equalized_odds_difference(..., method="between_groups",
    agg="worst_case")``. Arguments as in :func:`equal_opportunity_difference`; a group
    without negative targets is an error too.
    """
    owner = "equalized_odds_difference"
    tp, pos, fp, neg = _counts(preds, target, groups, num_groups, owner)
    _check_rates(pos, neg, owner, need_fpr=True)
    return as_result(_equalized_odds_difference_from_counts(tp, pos, fp, neg))
