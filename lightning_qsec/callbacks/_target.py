"""The quantized model an evaluation hook measures: the module itself, or a PTQ twin."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_qsec.batch import Batch, BatchAdapter, adapter_or_default
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.convert import quantize_model
from lightning_qsec.quant.inspect import is_quantized

__all__ = ["calibration_loader", "gathered_batches", "quantized_target", "single_loader"]


def gathered_batches(
    trainer: pl.Trainer, loader: Any, num_batches: int, batch_adapter: BatchAdapter | None
) -> list[Batch]:
    """Each rank's first ``num_batches`` batches, gathered from all ranks in rank order.

    Under DDP every rank then calibrates on the same global batches, so the scales equal
    those of a one-process run on the same data.
    """
    read = adapter_or_default(batch_adapter)
    gathered: list[Batch] = []
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        b = read(batch)
        inputs = trainer.strategy.all_gather(b.inputs.to(trainer.strategy.root_device))
        targets = trainer.strategy.all_gather(b.targets.to(trainer.strategy.root_device))
        gathered.append(Batch(inputs.flatten(0, 1), targets.flatten(0, 1)))
    return gathered


def single_loader(loader: Any) -> Any:
    loader = getattr(loader, "iterables", loader)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


def calibration_loader(trainer: pl.Trainer) -> Any:
    """Training batches if the trainer or datamodule has them, else the current evaluation batches."""
    if trainer.train_dataloader is not None:
        return single_loader(trainer.train_dataloader)
    datamodule = trainer.datamodule
    if datamodule is not None:
        try:
            return single_loader(datamodule.train_dataloader())
        except Exception:  # noqa: BLE001 - a datamodule without train data is allowed
            pass
    rank_zero_warn("No training data to calibrate the post-training quantized twin: calibrating on evaluation data.")
    return single_loader(trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders)


def quantized_target(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    calibrate_batches: int,
    batch_adapter: BatchAdapter | None = None,
) -> tuple[nn.Module, bool]:
    """``(model, is_twin)``: the module if it is quantized, else a calibrated PTQ twin.

    The twin is a copy quantized at w8a8 (bit widths are changed in place afterwards)
    and calibrated on ``calibrate_batches`` training batches (under DDP those of every
    rank, so all ranks build the same twin). It is the only copy any
    hook makes, and only for a module that has never been quantized. It is built under a
    forked RNG (new Brevitas layers draw initial values, a shuffled calibration loader
    draws its order), so adding a hook does not change what the model trains on next.
    """
    if is_quantized(pl_module):
        return pl_module, False
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False):
        twin = copy.deepcopy(pl_module)
        quantize_model(twin)
        loader = calibration_loader(trainer)
        if trainer.world_size > 1:  # every rank calibrates on all ranks' batches: one twin, as in one process
            loader, batch_adapter = gathered_batches(trainer, loader, calibrate_batches, batch_adapter), None
        calibrate(twin, loader, calibrate_batches, batch_adapter=batch_adapter)
    return twin.eval(), True
