"""Post-training calibration of activation scales."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from brevitas.graph.calibrate import calibration_mode
from torch import Tensor, nn

from lightning_qsec._validation import check_positive_int
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.quant.inspect import stat_scalers
from lightning_qsec.quant.precision import require_quantized
from lightning_qsec.quant.statistics import load_statistics_state, reset_statistics, statistics_state

__all__ = ["calibrate", "CalibrationNorm"]

CalibrationNorm = Literal["running", "batch"]
_NORMS = ("running", "batch")


def calibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int = 10,
    *,
    batch_adapter: BatchAdapter | None = None,
    batchnorm: CalibrationNorm = "running",
) -> nn.Module:
    """Set activation scales from data: post-training quantization (PTQ).

    Earlier statistics are reset first, so calibrating a trained model does not
    multiply its scales twice. Statistics are a true average over ``num_batches``
    batches of float activations (quantization is off while they are gathered, as in
    Brevitas' ``calibration_mode``). The model runs in eval mode (dropout off) and its
    train/eval flags are restored on exit. If calibration fails (an empty loader, NaN
    inputs), the statistics it had before are restored.

    BatchNorm layers normalise either with their running statistics
    (``batchnorm="running"``: post-training quantization of a trained model, whose
    running statistics are what it is deployed with) or with each batch's own
    statistics (``"batch"``: before quantization-aware training, which runs BatchNorm
    that way, and whose running statistics may still be the initial ones); their running
    statistics are never changed.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quant.quantize_model`.
        dataloader: an iterable of batches, read by the batch adapter; without one a
            batch may also be a bare input tensor or a 1-tuple (calibration needs no labels).
        num_batches: how many batches to use (>= 1); fewer if the loader ends first.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.
        batchnorm: ``"running"`` or ``"batch"`` (see above).

    Returns:
        ``model``, calibrated in place.

    Raises:
        ValueError: the model is not quantized, the loader is empty, a batch has NaN
            inputs, or an unknown ``batchnorm``.

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
    if batchnorm not in _NORMS:
        raise ValueError(f"batchnorm must be one of {_NORMS}, got {batchnorm!r}")
    read = adapter_or_default(batch_adapter)
    device = next(model.parameters()).device
    flags = {m: m.training for m in model.modules()}
    defaults = {s: (s.collect_stats_steps, s.momentum) for _, s in stat_scalers(model)}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    running = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in norms} if batchnorm == "batch" else {}
    before = statistics_state(model)
    seen = 0
    try:
        with torch.inference_mode(False), torch.no_grad():
            reset_statistics(model)
            model.eval()
            for norm in running:
                norm.train()
            with calibration_mode(model):
                for batch in dataloader:
                    inputs = _inputs(batch, read, batch_adapter is None)
                    if inputs.is_floating_point() and torch.isnan(inputs).any():
                        raise ValueError(f"calibration inputs contain NaN (batch {seen} of dataloader)")
                    model(inputs.to(device))
                    seen += 1
                    if seen >= num_batches:
                        break
                if seen == 0:
                    raise ValueError("dataloader is empty: calibrate needs at least one batch")
    except BaseException:
        load_statistics_state(model, before)  # counters, steps, momentum and scales as they were
        raise
    else:
        for scaler, (steps, momentum) in defaults.items():
            scaler.collect_stats_steps, scaler.momentum = steps, momentum
            scaler.counter = steps + 1  # collection is over: the learned phase starts
    finally:
        for norm, state in running.items():
            norm.load_state_dict(state)
        for module, training in flags.items():
            module.train(training)
    return model


def _inputs(batch: Any, read: BatchAdapter, unlabeled_allowed: bool) -> Tensor:
    """The inputs of a calibration batch: a bare tensor or a 1-tuple is taken as inputs alone."""
    if unlabeled_allowed:
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
            return batch[0]
    return read(batch).inputs
