"""A minimal classification LightningModule around any ``nn.Module``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec.batch import read_batch

__all__ = ["ClassificationModule"]


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training with Adam, logging ``train_loss``, ``val_loss``/``val_acc`` and ``test_acc``.

    It is for the demo, the CLI presets and the tests; lightning-qsec's callbacks work
    with any LightningModule.

    Args:
        net: the network; defaults to :class:`~lightning_qsec.models.DigitsCNN`.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> from lightning_qsec.models import ClassificationModule, DigitsCNN
        >>> module = ClassificationModule(DigitsCNN(), lr=1e-3)
    """

    def __init__(self, net: nn.Module | None = None, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if net is None:
            from lightning_qsec.models.cnn import DigitsCNN

            net = DigitsCNN()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        b = read_batch(batch)
        logits = self(b.inputs)
        loss = F.cross_entropy(logits, b.targets)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", sync_dist=stage != "train")
        if stage != "train":
            acc = (logits.argmax(1) == b.targets).float().mean()
            self.log(f"{stage}_acc", acc, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
