"""Equalized odds and equal opportunity differences as torchmetrics :class:`~torchmetrics.Metric` s."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional._groups import as_result, check_num_groups
from lightning_qsec.metrics.functional.equalized_odds import (
    _check_rates,
    _equal_opportunity_difference_from_counts,
    _equalized_odds_difference_from_counts,
    _rates_update,
)

__all__ = ["EqualOpportunityDifference", "EqualizedOddsDifference"]


class _GroupRates(CountStateMetric):
    """Per-group true/false positive counts (binary classification), sum-reduced."""

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    true_pos: Tensor
    pos: Tensor
    false_pos: Tensor
    neg: Tensor

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = check_num_groups(num_groups, type(self).__name__)
        for name in ("true_pos", "pos", "false_pos", "neg"):
            self.add_state(name, default=torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add one batch: predicted labels 0/1 ``(N,)`` or logits ``(N, 2)``, targets 0/1 ``(N,)``, groups ``(N,)``.

        Raises:
            ValueError: on non-binary predictions or targets, a bad shape or dtype,
                different ``N``, or a group label outside ``0..num_groups-1``.
        """
        tp, pos, fp, neg = _rates_update(preds, target, groups, self.num_groups, type(self).__name__)
        self.true_pos += tp.to(self.true_pos.device)
        self.pos += pos.to(self.pos.device)
        self.false_pos += fp.to(self.false_pos.device)
        self.neg += neg.to(self.neg.device)


class EqualizedOddsDifference(_GroupRates):
    """The larger of the group TPR difference and the group FPR difference; 0 is equalized odds.

    Equals ``fairlearn.metrics.equalized_odds_difference(..., method="between_groups",
    agg="worst_case")``. Binary classification only. The state is four
    ``(num_groups,)`` count tensors, sum-reduced (exact under DDP). :meth:`compute`
    raises a ``ValueError`` if nothing was seen, if a group never appeared, has a single
    sample, or has no positive or no negative targets (its TPR or FPR would be
    undefined; fairlearn reports 0 there). Called on a batch (``forward``), it adds the
    batch like :meth:`update` and returns the batch's own value, ``nan`` where that batch
    alone leaves it undefined (a group missing, of one sample or without positives).

    Args:
        num_groups: number of sensitive groups; group labels are ``0..num_groups-1``.
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = EqualizedOddsDifference(num_groups=2)
        >>> target = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0])
        >>> groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> metric.update(torch.tensor([1, 1, 0, 1, 1, 0, 0, 0]), target, groups)
        >>> metric.compute()  # TPR 1.0 vs 0.5, FPR 0.5 vs 0.0
        tensor(0.5000)
    """

    def _value(self, *, true_pos: Tensor, pos: Tensor, false_pos: Tensor, neg: Tensor) -> Tensor:
        _check_rates(pos, neg, type(self).__name__, need_fpr=True)
        return as_result(_equalized_odds_difference_from_counts(true_pos, pos, false_pos, neg))


class EqualOpportunityDifference(_GroupRates):
    """Largest minus smallest group true positive rate; 0 is equal opportunity.

    Equals ``fairlearn.metrics.equal_opportunity_difference(..., method="between_groups")``.
    Arguments and states as in :class:`EqualizedOddsDifference`; only a group without
    positive targets (not one without negatives) is an error. ``forward`` returns the
    batch's own value, ``nan`` where that batch alone leaves it undefined.

    Example:
        >>> import torch
        >>> metric = EqualOpportunityDifference(num_groups=2)
        >>> metric.update(torch.tensor([1, 0, 0, 1]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 1, 1]))
        >>> metric.compute()
        tensor(0.)
    """

    def _value(self, *, true_pos: Tensor, pos: Tensor, false_pos: Tensor, neg: Tensor) -> Tensor:
        _check_rates(pos, neg, type(self).__name__, need_fpr=False)
        return as_result(_equal_opportunity_difference_from_counts(true_pos, pos))
