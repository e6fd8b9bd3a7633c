"""Functional quantization disagreement: how often a quantized model changes a prediction.

Example:
    >>> import torch
    >>> quantization_disagreement(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    tensor(0.2500)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_qsec.metrics.functional._checks import (
    check_same_length,
    check_same_num_classes,
    safe_ratio,
    to_labels,
)

__all__ = ["quantization_disagreement"]


def _quantization_disagreement_update(reference_preds: Tensor, quantized_preds: Tensor) -> tuple[Tensor, Tensor]:
    """Count disagreements and samples in one batch.

    Returns:
        ``(disagreements, total)`` as 0-d integer tensors.
    """
    check_same_num_classes(reference_preds=reference_preds, quantized_preds=quantized_preds)
    ref = to_labels(reference_preds, "reference_preds")
    quant = to_labels(quantized_preds, "quantized_preds")
    check_same_length(reference_preds=ref, quantized_preds=quant)
    return (ref != quant).sum(), torch.tensor(ref.shape[0], device=ref.device)


def _quantization_disagreement_compute(disagreements: Tensor, total: Tensor) -> Tensor:
    """Disagreement rate from counts; ``nan`` when ``total`` is 0."""
    return safe_ratio(disagreements, total)


def quantization_disagreement(reference_preds: Tensor, quantized_preds: Tensor) -> Tensor:
    """Fraction of samples whose predicted class differs between a float and a quantized model.

    Also called the *flip rate* or *prediction disagreement* between a model and its
    quantized/compressed version: it exposes changes that top-1 accuracy hides, because
    corrections and new errors can cancel out in accuracy (see Hong et al., "Qu-ANTI-zation:
    Exploiting Quantization Artifacts for Achieving Adversarial Outcomes", NeurIPS 2021,
    https://arxiv.org/abs/2110.13541, where an attacker maximizes exactly this disagreement).

    Args:
        reference_preds: predictions of the float reference model, either integer class
            indices of shape ``(N,)`` or logits/probabilities of shape ``(N, C)``
            (reduced with ``argmax`` over dim 1).
        quantized_preds: predictions of the quantized model on the same samples, in either
            of the same two forms; both forms may be mixed.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (lower is better); ``nan`` when ``N == 0``.

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: if an argument has another shape or dtype, if the two arguments have
            different ``N``, or if both are ``(N, C)`` with different ``C``.

    Example:
        >>> import torch
        >>> reference = torch.tensor([[2.0, 0.1], [0.3, 1.5], [0.9, 0.2]])  # classes 0, 1, 0
        >>> quantized = torch.tensor([0, 0, 0])
        >>> quantization_disagreement(reference, quantized)
        tensor(0.3333)
    """
    return _quantization_disagreement_compute(*_quantization_disagreement_update(reference_preds, quantized_preds))
