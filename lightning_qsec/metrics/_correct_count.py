"""The state every top-1 accuracy metric shares: sum-reduced ``correct`` and ``total`` counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_qsec.metrics.functional._checks import safe_ratio

__all__ = ["CorrectCount"]


class CorrectCount(Metric):
    """Base of the accuracy metrics: exact under DDP whatever the shard sizes, ``nan`` before any sample.

    A subclass's ``update`` checks its own arguments and calls :meth:`_add`.
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

    def _add(self, correct: Tensor, total: Tensor) -> None:
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Tensor:
        """Accuracy over all batches (and all processes); ``nan`` if none was seen."""
        return safe_ratio(self.correct, self.total)
