"""Quantization-induced disparity as a torchmetrics :class:`~torchmetrics.Metric`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional._groups import as_result, check_group_counts, check_num_groups
from lightning_qsec.metrics.functional.quantization_induced_disparity import (
    _group_accuracy_drop_from_counts,
    _qid_from_counts,
    _qid_update,
)

__all__ = ["QuantizationInducedDisparity"]


class QuantizationInducedDisparity(CountStateMetric):
    """How much more accuracy the worst-hit group loses than the average, float -> quantized.

    ``max_g (acc_float[g] - acc_quant[g]) - (acc_float - acc_quant)``: the worst group's
    accuracy drop minus the overall accuracy drop (the size-weighted mean of the group
    drops), so it is ``>= 0`` and 0 when every group loses alike. See
    :func:`~lightning_qsec.metrics.functional.quantization_induced_disparity`. Any number
    of classes. The state is three ``(num_groups,)`` count tensors, sum-reduced (exact
    under DDP). :meth:`compute` raises a ``ValueError`` if nothing was seen, if a group
    never appeared or if a group has a single sample; :meth:`group_drops` gives the
    per-group drops. Called on a batch (``forward``), it adds the batch like
    :meth:`update` and returns the batch's own value, ``nan`` where that batch alone
    leaves it undefined (a group missing or of one sample).

    Args:
        num_groups: number of sensitive groups; group labels are ``0..num_groups-1``.
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = QuantizationInducedDisparity(num_groups=2)
        >>> target = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
        >>> groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> metric.update(target, torch.tensor([1, 0, 1, 0, 0, 1, 1, 0]), target, groups)
        >>> metric.compute()  # group 1 loses 0.5, the average 0.25
        tensor(0.2500)
        >>> metric.group_drops()
        tensor([0.0000, 0.5000])
    """

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0

    float_correct: Tensor
    quant_correct: Tensor
    total: Tensor

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = check_num_groups(num_groups, type(self).__name__)
        for name in ("float_correct", "quant_correct", "total"):
            self.add_state(name, default=torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, float_preds: Tensor, quant_preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add one batch.

        Args:
            float_preds: float model predictions, class indices ``(N,)`` or logits ``(N, C)``.
            quant_preds: quantized model predictions on the same samples, either form.
            target: true class indices ``(N,)``.
            groups: group labels ``0..num_groups-1``, shape ``(N,)``.

        Raises:
            ValueError: on a bad shape or dtype, different ``N`` or ``C``, or a group label
                outside ``0..num_groups-1``.
        """
        fc, qc, total = _qid_update(float_preds, quant_preds, target, groups, self.num_groups)
        self.float_correct += fc.to(self.float_correct.device)
        self.quant_correct += qc.to(self.quant_correct.device)
        self.total += total.to(self.total.device)

    def group_drops(self) -> Tensor:
        """Per-group accuracy drop float -> quantized ``(num_groups,)`` (negative: a gain), over all processes."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=self._should_unsync):
            states = {name: state.clone() for name, state in self._states().items()}
        check_group_counts(states["total"], type(self).__name__)  # out of the context, which an error would not unsync
        return as_result(_group_accuracy_drop_from_counts(**states))

    def _value(self, *, float_correct: Tensor, quant_correct: Tensor, total: Tensor) -> Tensor:
        check_group_counts(total, type(self).__name__)
        return as_result(_qid_from_counts(float_correct, quant_correct, total))
