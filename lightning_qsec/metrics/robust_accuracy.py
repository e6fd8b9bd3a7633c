"""Robust accuracy as a torchmetrics :class:`~torchmetrics.Metric`."""

from __future__ import annotations

from torch import Tensor

from lightning_qsec.metrics._correct_count import CorrectCount
from lightning_qsec.metrics.functional.robust_accuracy import _robust_accuracy_update

__all__ = ["RobustAccuracy"]


class RobustAccuracy(CorrectCount):
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
        self._add(*_robust_accuracy_update(adv_preds, target))
