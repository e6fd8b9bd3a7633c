"""Quantization disagreement as a torchmetrics :class:`~torchmetrics.Metric`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional.disagreement import (
    _quantization_disagreement_compute,
    _quantization_disagreement_update,
)

__all__ = ["QuantizationDisagreement"]


class QuantizationDisagreement(CountStateMetric):
    """Fraction of samples whose predicted class differs between a float and a quantized model.

    Also called the *flip rate* between a model and its quantized version. Unlike a drop
    in accuracy, it counts every changed prediction, so corrections cannot hide new
    errors; Hong et al., "Qu-ANTI-zation: Exploiting Quantization Artifacts for Achieving
    Adversarial Outcomes", NeurIPS 2021 (https://arxiv.org/abs/2110.13541) show attacks
    that maximize it.

    The metric keeps two sum-reduced counts, ``disagreements`` and ``total``, so it is
    exact under DDP whatever the shard sizes. :meth:`compute` returns ``nan`` when no
    sample has been seen. Called on a batch (``forward``), it adds the batch like
    :meth:`update` and returns the batch's own rate (``nan`` for an empty batch); a batch
    that :meth:`update` rejects leaves the counts unchanged.

    Args:
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = QuantizationDisagreement()
        >>> metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        >>> metric.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))  # logits work too
        >>> metric.compute()
        tensor(0.4000)
    """

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    disagreements: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("disagreements", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, reference_preds: Tensor, quantized_preds: Tensor) -> None:
        """Add one batch.

        Args:
            reference_preds: predictions of the float reference model, integer class indices
                ``(N,)`` or logits/probabilities ``(N, C)``.
            quantized_preds: predictions of the quantized model on the same samples, in
                either form.

        Raises:
            ValueError: if an argument has another shape or dtype, or the two have
                different ``N`` (or different ``C`` when both are ``(N, C)``).
        """
        self._add(*_quantization_disagreement_update(reference_preds, quantized_preds))

    def _value(self, *, disagreements: Tensor, total: Tensor) -> Tensor:
        """Disagreement rate; ``nan`` if no sample was counted."""
        return _quantization_disagreement_compute(disagreements, total)
