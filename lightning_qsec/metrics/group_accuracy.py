"""Per-group and worst-group accuracy as a torchmetrics :class:`~torchmetrics.Metric`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional._groups import as_result, check_group_counts, check_num_groups
from lightning_qsec.metrics.functional.group_accuracy import (
    _group_accuracy_from_counts,
    _group_accuracy_update,
)

__all__ = ["GroupAccuracy"]


class GroupAccuracy(CountStateMetric):
    """Accuracy within each sensitive group, and the worst of them.

    Equals fairlearn's ``MetricFrame(metrics=accuracy_score, ...)``: ``by_group`` and
    ``group_min()``. The state is two ``(num_groups,)`` count tensors (``correct``,
    ``total``), sum-reduced, so the metric is exact under DDP whatever the shards.

    :meth:`compute` returns a dict: ``"group_<g>"`` -> accuracy of group ``g`` for every
    group, and ``"worst_group_accuracy"``; it can go straight to ``self.log_dict``.
    It raises a ``ValueError`` if nothing was seen, if a group ``0..num_groups-1``
    never appeared, or if a group has a single sample. Called on a batch (``forward``),
    it adds the batch like :meth:`update` and returns the batch's own dict, all ``nan``
    where that batch alone leaves it undefined (a group missing or of one sample).

    Args:
        num_groups: number of sensitive groups; group labels are ``0..num_groups-1``.
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = GroupAccuracy(num_groups=2)
        >>> metric.update(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0]), torch.tensor([0, 0, 1]))
        >>> metric.update(torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([1, 0]), torch.tensor([1, 1]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'group_0': 1.0, 'group_1': 0.6667, 'worst_group_accuracy': 0.6667}
    """

    is_differentiable: bool = False
    higher_is_better: bool = True
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    correct: Tensor
    total: Tensor

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = check_num_groups(num_groups, type(self).__name__)
        self.add_state("correct", default=torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add one batch: predictions ``(N,)`` or ``(N, C)``, targets ``(N,)``, group labels ``(N,)``.

        Raises:
            ValueError: on a bad shape or dtype, different ``N``, or a group label outside
                ``0..num_groups-1``.
        """
        correct, total = _group_accuracy_update(preds, target, groups, self.num_groups)
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def _value(self, *, correct: Tensor, total: Tensor) -> dict[str, Tensor]:
        """Per-group accuracies (``"group_<g>"``) and ``"worst_group_accuracy"``."""
        check_group_counts(total, type(self).__name__)
        acc = _group_accuracy_from_counts(correct, total)
        out = {f"group_{g}": as_result(acc[g]) for g in range(self.num_groups)}
        out["worst_group_accuracy"] = as_result(acc.amin())
        return out

    def _undefined(self) -> dict[str, Tensor]:
        nan = super()._undefined()
        return {**{f"group_{g}": nan.clone() for g in range(self.num_groups)}, "worst_group_accuracy": nan}
