"""Post-training calibration of activation scales."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn

from lightning_qsec._validation import check_positive_int
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.quant.inspect import stat_scalers
from lightning_qsec.quant.precision import require_quantized
from lightning_qsec.quant.statistics import reset_statistics

__all__ = ["calibrate"]


def calibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int = 10,
    *,
    batch_adapter: BatchAdapter | None = None,
) -> nn.Module:
    """Set activation scales from data: post-training quantization (PTQ).

    Earlier statistics are reset first, so calibrating a trained model does not
    multiply its scales twice. Statistics are a true average over ``num_batches``
    batches of float activations (quantization is off while they are gathered, as in
    Brevitas' ``calibration_mode``). The model stays in eval mode, so BatchNorm running
    statistics and dropout are untouched; its train/eval flags are restored on exit.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quant.quantize_model`.
        dataloader: an iterable of batches, read by the batch adapter.
        num_batches: how many batches to use (>= 1); fewer if the loader ends first.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.

    Returns:
        ``model``, calibrated in place.

    Raises:
        ValueError: the model is not quantized, the loader is empty, or a batch has NaN inputs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model, calibrate
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
        >>> _ = calibrate(net, data, num_batches=3)
    """
    require_quantized(model)
    check_positive_int(num_batches, "num_batches")
    read = adapter_or_default(batch_adapter)
    device = next(model.parameters()).device
    flags = {m: m.training for m in model.modules()}
    defaults = {s: (s.collect_stats_steps, s.momentum) for _, s in stat_scalers(model)}
    seen = 0
    try:
        with torch.inference_mode(False), torch.no_grad():
            reset_statistics(model)
            model.eval()
            with calibration_mode(model):
                for batch in dataloader:
                    inputs = read(batch).inputs
                    if inputs.is_floating_point() and torch.isnan(inputs).any():
                        raise ValueError(f"calibration inputs contain NaN (batch {seen} of dataloader)")
                    model(inputs.to(device))
                    seen += 1
                    if seen >= num_batches:
                        break
                if seen == 0:
                    raise ValueError("dataloader is empty: calibrate needs at least one batch")
    finally:
        for scaler, (steps, momentum) in defaults.items():
            scaler.collect_stats_steps, scaler.momentum = steps, momentum
            if seen > 0:
                scaler.counter = steps + 1  # collection is over: the learned phase starts
        for module, training in flags.items():
            module.train(training)
    return model
