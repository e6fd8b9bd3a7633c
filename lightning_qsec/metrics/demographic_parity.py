"""Demographic parity difference and ratio as torchmetrics :class:`~torchmetrics.Metric` s."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional._groups import as_result, check_group_counts, check_num_groups
from lightning_qsec.metrics.functional.demographic_parity import (
    _demographic_parity_difference_from_counts,
    _demographic_parity_ratio_from_counts,
    _demographic_parity_update,
)

__all__ = ["DemographicParityDifference", "DemographicParityRatio"]


class _SelectionRates(CountStateMetric):
    """Per-group selected/total counts (binary classification), sum-reduced."""

    is_differentiable: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    selected: Tensor
    total: Tensor

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = check_num_groups(num_groups, type(self).__name__)
        self.add_state("selected", default=torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add one batch: predicted labels 0/1 ``(N,)`` or logits ``(N, 2)``, targets 0/1 ``(N,)``, groups ``(N,)``.

        Raises:
            ValueError: on non-binary predictions or targets, a bad shape or dtype,
                different ``N``, or a group label outside ``0..num_groups-1``.
        """
        selected, total = _demographic_parity_update(preds, target, groups, self.num_groups, type(self).__name__)
        self.selected += selected.to(self.selected.device)
        self.total += total.to(self.total.device)


class DemographicParityDifference(_SelectionRates):
    """Largest minus smallest group selection rate ``P(pred = 1 | group)``; 0 is parity.

    Equals ``fairlearn.metrics.demographic_parity_difference(..., method="between_groups")``.
    Binary classification only (targets and predicted labels 0/1, or logits ``(N, 2)``).
    The state is two ``(num_groups,)`` count tensors, sum-reduced (exact under DDP).
    :meth:`compute` raises a ``ValueError`` if nothing was seen, if a group never
    appeared or if a group has a single sample. Called on a batch (``forward``, as in
    ``self.log(name, metric(preds, target, groups))``), it adds the batch like
    :meth:`update` and returns the batch's own value, ``nan`` where that batch alone
    leaves it undefined (a group missing or of one sample).

    Args:
        num_groups: number of sensitive groups; group labels are ``0..num_groups-1``.
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = DemographicParityDifference(num_groups=2)
        >>> metric.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
        >>> metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([0, 1]))
        >>> metric.compute()  # 3/3 vs 0/3 selected
        tensor(1.)
    """

    higher_is_better: bool = False

    def _value(self, *, selected: Tensor, total: Tensor) -> Tensor:
        check_group_counts(total, type(self).__name__)
        return as_result(_demographic_parity_difference_from_counts(selected, total))


class DemographicParityRatio(_SelectionRates):
    """Smallest over largest group selection rate; 1 is parity, ``nan`` if no group selects anyone.

    Equals ``fairlearn.metrics.demographic_parity_ratio(..., method="between_groups")``.
    Arguments, states, errors and the batch value of ``forward`` as in
    :class:`DemographicParityDifference`.

    Example:
        >>> import torch
        >>> metric = DemographicParityRatio(num_groups=2)
        >>> metric.update(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
        >>> metric.compute()  # 0.5 / 1.0
        tensor(0.5000)
    """

    higher_is_better: bool = True

    def _value(self, *, selected: Tensor, total: Tensor) -> Tensor:
        check_group_counts(total, type(self).__name__)
        return as_result(_demographic_parity_ratio_from_counts(selected, total))
