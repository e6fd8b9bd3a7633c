"""Robust accuracy as a torchmetrics :class:`~torchmetrics.Metric`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_qsec.metrics.functional.robust_accuracy import _robust_accuracy_compute, _robust_accuracy_update

__all__ = ["RobustAccuracy"]


class RobustAccuracy(Metric):
    """Top-1 accuracy of a model on adversarially perturbed inputs.

    Every sample counts, including those already misclassified on clean input, as in
    RobustBench (Croce et al., 2021, https://arxiv.org/abs/2010.09670).

    The metric keeps two sum-reduced counts, ``correct`` and ``total``, so it is exact
    under DDP whatever the shard sizes. :meth:`compute` returns ``nan`` when no sample
    has been seen.

    Args:
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = RobustAccuracy()
        >>> metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
        >>> metric.update(torch.tensor([[0.2, 0.8]]), torch.tensor([0]))  # logits work too
        >>> metric.compute()
        tensor(0.5000)
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

    def update(self, adv_preds: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            adv_preds: predictions on adversarial inputs, integer class indices ``(N,)``
                or logits/probabilities ``(N, C)``.
            target: true integer class indices ``(N,)``.

        Raises:
            ValueError: if an argument has another shape or dtype, or the two have
                different ``N``.
        """
        correct, total = _robust_accuracy_update(adv_preds, target)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """Robust accuracy over all batches (and all processes); ``nan`` if none was seen."""
        return _robust_accuracy_compute(self.correct, self.total)
