"""The state every top-1 accuracy metric shares: sum-reduced ``correct`` and ``total`` counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional._checks import safe_ratio

__all__ = ["CorrectCount"]


class CorrectCount(CountStateMetric):
    """Base of the accuracy metrics: exact under DDP whatever the shard sizes, ``nan`` before any sample.

    A subclass's ``update`` checks its own arguments and calls ``self._add(correct, total)``.
    Called on a batch (``forward``), the metric adds the batch like ``update`` and returns
    the batch's own accuracy (``nan`` for an empty batch); a rejected batch changes nothing.
    """

    is_differentiable: bool = False
    higher_is_better: bool = True
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _value(self, *, correct: Tensor, total: Tensor) -> Tensor:
        """Accuracy; ``nan`` if no sample was counted."""
        return safe_ratio(correct, total)
