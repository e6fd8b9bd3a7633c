"""Gradient-L1 regularization for robustness to post-training quantization."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.defenses._regularizer import BatchRegularizer, CoefficientLike

__all__ = ["GradientL1Regularization", "LossFn"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class GradientL1Regularization(BatchRegularizer):
    """Penalize the L1 norm of the loss gradient w.r.t. the weights (double backprop).

    Alizadeh, Behboodi, van Baalen, Louizos, Blankevoort & Welling, "Gradient L1
    Regularization for Quantization Robustness", ICLR 2020,
    https://arxiv.org/abs/2002.07520. Quantization moves each weight by at most half a
    step, an L-infinity-bounded perturbation ``delta``; to first order the loss changes by
    ``<delta, dL/dW> <= ||delta||_inf * ||dL/dW||_1``. Training with the extra term

    ``lam * sum_l ||dL/dW_l||_1``

    (``L`` the cross-entropy of the current batch, ``W_l`` the conv/linear weights)
    flattens the loss against such perturbations, so that one float model can be
    quantized after training (PTQ) to several bit widths.

    Mechanism (see :mod:`lightning_qsec.defenses._regularizer`): the batch is taken in
    ``on_train_batch_start`` (read by ``batch_adapter``); in ``on_after_backward`` the
    loss ``loss_fn(pl_module(x), y)`` is recomputed, its weight gradient taken with
    ``create_graph=True``, and the gradient of ``lam * ||.||_1`` w.r.t. every trainable
    parameter is added to ``.grad``, scaled by ``1 / accumulate_grad_batches`` (and by the
    AMP loss scale when a ``GradScaler`` runs) and averaged over DDP ranks. The extra
    forward runs in the very train/eval mode of training (and at the precision set by
    :class:`~lightning_qsec.defenses.RandomPrecisionTraining`, if any), under the
    precision plugin's autocast, with a forked RNG (dropout masks drawn there do not shift
    the training stream), and without consuming statistics: BatchNorm running stats and
    Brevitas activation statistics still being collected are restored afterwards. The
    user's module, loss and ``forward`` are not changed. Cost: about one extra forward
    and two extra backward passes per batch. Logged as ``qsec/reg/gradient_l1`` (the L1
    norm, before ``lam``).

    Args:
        lam: coefficient ``>= 0``, or ``(epoch, value)`` milestones (see
            :class:`~lightning_qsec.defenses._regularizer.Coefficient`). The paper uses
            ``0.05`` on CIFAR-10. While it is 0 nothing is computed.
        loss_fn: ``loss_fn(logits, targets) -> scalar``; default ``F.cross_entropy``
            (the module's ``forward`` must then return logits).
        batch_adapter: reads a batch into a :class:`~lightning_qsec.Batch`; default
            :func:`~lightning_qsec.read_batch`.
        skip: names or globs of conv/linear modules whose gradient is not penalized.

    Raises:
        ValueError: a bad ``lam`` or ``skip``, a ``loss_fn``/``batch_adapter`` that is not
            callable, a ``skip`` glob that matches no layer, or manual optimization.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.defenses import GradientL1Regularization
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      callbacks=[GradientL1Regularization(lam=0.05)])
    """

    name: ClassVar[str] = "gradient_l1"
    coefficient_argument: ClassVar[str] = "lam"

    def __init__(
        self,
        lam: CoefficientLike,
        *,
        loss_fn: LossFn | None = None,
        batch_adapter: BatchAdapter | None = None,
        skip: Sequence[str] = (),
    ) -> None:
        super().__init__(lam, skip=skip)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"loss_fn must be a callable loss_fn(logits, targets) -> Tensor or None, got {loss_fn!r}"
            )
        if batch_adapter is not None and not callable(batch_adapter):
            raise ValueError(
                f"batch_adapter must be a callable batch -> lightning_qsec.Batch or None, got {batch_adapter!r}"
            )
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)

    def batch_term(self, trainer: pl.Trainer, pl_module: pl.LightningModule, held: Any) -> Tensor | None:
        weights = self.weights(pl_module)
        if not weights:  # every regularized weight is frozen
            return None
        batch = self._read(held)
        x = batch.inputs.to(pl_module.device)
        y = batch.targets.to(pl_module.device)
        with trainer.precision_plugin.forward_context():
            loss = self.loss_fn(pl_module(x), y)
        weight_grads = torch.autograd.grad(loss.float(), weights, create_graph=True)
        return torch.stack([g.abs().sum() for g in weight_grads]).sum()
