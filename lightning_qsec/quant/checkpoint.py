"""Load quantized checkpoints safely: ``torch.load(weights_only=True)``, never a pickle."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.convert import quantize_model

__all__ = ["safe_load", "load_quantized_checkpoint", "find_quant_config"]

QAT_STATE_PREFIX = "QuantizationAwareTraining"


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a pickled payload raises ``ValueError``.

    A quantization-security library must never execute code hidden in a checkpoint.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load {os.fspath(path)!r}: it holds objects that are not plain tensors "
            f"and containers (a pickled payload), and lightning-qsec loads with weights_only=True. "
            f"Detail: {str(err).splitlines()[0]}"
        ) from err


def find_quant_config(checkpoint: Mapping[str, Any]) -> QuantConfig:
    """The :class:`QuantConfig` recorded by the QAT callback (or :func:`save`) in a checkpoint."""
    if "qsec_config" in checkpoint:
        return QuantConfig.from_dict(checkpoint["qsec_config"])
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(QAT_STATE_PREFIX) and "config" in state:
            return QuantConfig.from_dict(state["config"])
    raise ValueError(
        "checkpoint records no quantization settings: expected a Lightning checkpoint written "
        "with the QuantizationAwareTraining callback, or a file with a 'qsec_config' entry"
    )


def _model_state(checkpoint: Mapping[str, Any], prefix: str | None) -> dict[str, Any]:
    state = dict(checkpoint.get("state_dict", checkpoint))
    if prefix is None:
        prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
        prefix = prefixes.pop() if len(prefixes) == 1 else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_quantized_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    map_location: Any = "cpu",
) -> nn.Module:
    """Quantize a float model as the checkpoint records, load its weights, return it in eval mode.

    The one call for inference from a QAT checkpoint: it works on the user's own
    float ``nn.Module`` or ``LightningModule``.

    Args:
        model: a float model of the trained architecture (a new instance).
        path: a Lightning ``.ckpt`` written with the QAT callback, or a file from
            ``torch.save({"qsec_config": ..., "state_dict": ...})``.
        prefix: key prefix to strip when ``model`` is a submodule of the trained
            LightningModule (e.g. ``"net."``); by default a single common top-level
            prefix is stripped only if the keys do not match ``model`` as they are.
        map_location: as for ``torch.load``.

    Returns:
        The quantized ``model`` with the checkpoint's weights, scales and bit widths, in eval mode.

    Example::

        model = load_quantized_checkpoint(MyLitModule(), "epoch=9.ckpt")  # a QAT checkpoint
    """
    checkpoint = safe_load(path, map_location=map_location)
    config = find_quant_config(checkpoint)
    quantize_model(model, **config.to_dict())
    state = dict(checkpoint.get("state_dict", checkpoint))
    own = set(model.state_dict())
    if prefix is not None or not (set(state) >= own and set(state) & own):
        state = _model_state(checkpoint, prefix)
    result = model.load_state_dict(state, strict=False)
    # Brevitas omits an activation scale that never saw data (no statistics, no calibration):
    # such a scaler stays in its initial state, exactly as it was saved.
    missing = [k for k in result.missing_keys if not k.endswith("scaling_impl.value")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {result.unexpected_keys}"
        )
    return model.eval()
