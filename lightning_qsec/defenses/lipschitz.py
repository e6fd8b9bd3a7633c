"""Lipschitz (orthogonality) regularization of Defensive Quantization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_qsec.defenses._regularizer import CoefficientLike, WeightRegularizer

__all__ = ["LipschitzRegularization", "orthogonality_penalty"]


def orthogonality_penalty(weights: Sequence[Tensor]) -> Tensor:
    """``sum_l ||W_l W_l^T - I||_F^2`` with each ``W_l`` reshaped to ``(out, -1)``.

    Zero when the rows of every ``W_l`` are orthonormal. A layer with more outputs than
    inputs per output (``out > in * k * k``) cannot reach zero: its floor is
    ``out - in * k * k``. DQ writes the term as ``||W_l^T W_l - I||_F^2``; both Gram forms
    equal ``sum_i (sigma_i^2 - 1)^2`` over the singular values of ``W_l`` plus a constant
    (the number of missing singular values on that side), so they have the same
    gradient and the same minimizers: every singular value 1, a 1-Lipschitz layer.

    Example:
        >>> float(orthogonality_penalty([torch.eye(3)]))
        0.0
    """
    total = weights[0].new_zeros(())
    for w in weights:
        m = w.reshape(w.shape[0], -1)
        gram = m @ m.t()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        total = total + (gram - eye).pow(2).sum()
    return total


class LipschitzRegularization(WeightRegularizer):
    """Keep each layer's Lipschitz constant near 1: Defensive Quantization's orthogonality term.

    Lin, Gan & Han, "Defensive Quantization: When Efficiency Meets Robustness", ICLR 2019,
    https://arxiv.org/abs/1904.08444. Quantization error is amplified layer by layer
    when layers expand distances; DQ trains with the extra term

    ``beta / 2 * sum_l ||W_l W_l^T - I||_F^2``

    over every conv/linear weight ``W_l`` reshaped to ``(out_channels, -1)``, which
    pushes the rows toward orthonormality (spectral norm near 1) so that adversarial
    noise stays non-expansive through the quantized network. Every conv/linear layer is
    regularized, the classifier included, unless ``skip`` names it. Train it with QAT
    at the low precision that is deployed (DQ's setting), and measure the effect with
    :func:`~lightning_qsec.quant.amplification.error_amplification_ratio` and
    :func:`~lightning_qsec.quant.amplification.amplification_profile` at an ``eps`` of
    at least one input quantization step (below it the quantized model denoises).

    The term is weight-only: its gradient is added to the weights' ``.grad`` once per
    optimizer step, in ``on_before_optimizer_step`` (see
    :mod:`lightning_qsec.defenses._regularizer`). The user's module and loss are not
    changed. Logged as ``qsec/reg/lipschitz`` (the sum, before ``beta / 2``).

    Args:
        beta: coefficient ``>= 0``, or ``(epoch, value)`` milestones (see
            :class:`~lightning_qsec.defenses._regularizer.Coefficient`). DQ used values
            around ``3e-4``..``6e-4`` on CIFAR-10. On MNIST-5k at w4a4, ``1e-3`` lowers
            the error-amplification ratio by 0.11 ± 0.03 and costs 0.2 points of
            accuracy (3 seeds, ``benchmarks/regularizers.py``).
        skip: names or globs of conv/linear modules left unregularized.

    Raises:
        ValueError: a bad ``beta`` or ``skip`` (at construction), a ``skip`` glob that
            matches no layer, or manual optimization (at ``setup``).

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.callbacks import QuantizationAwareTraining
        >>> from lightning_qsec.defenses import LipschitzRegularization
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      callbacks=[QuantizationAwareTraining(4, 4), LipschitzRegularization(beta=1e-3)])
    """

    name: ClassVar[str] = "lipschitz"
    coefficient_argument: ClassVar[str] = "beta"
    factor: ClassVar[float] = 0.5

    def __init__(self, beta: CoefficientLike, *, skip: Sequence[str] = ()) -> None:
        super().__init__(beta, skip=skip)

    def penalty(self, weights: Sequence[Tensor]) -> Tensor:
        return orthogonality_penalty(weights)
