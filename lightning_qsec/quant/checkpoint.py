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
from lightning_qsec.quant.precision import require_float

__all__ = ["safe_load", "load_quantized_checkpoint", "find_quant_config"]

QAT_STATE_PREFIX = "QuantizationAwareTraining"


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a pickled payload raises ``ValueError``.

    A quantization-security library must never execute code hidden in a checkpoint.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(
            f"refused to load {os.fspath(path)!r}: it holds objects that are not plain tensors "
            f"and containers (a pickled payload), and lightning-qsec loads with weights_only=True. "
            f"Detail: {detail}. If that class is yours and trusted (a pathlib.Path in saved "
            "hyperparameters, say), allow it with `with torch.serialization.safe_globals([TheClass]): ...`; "
            "loading stays weights_only=True"
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
        "with the QuantizationAwareTraining callback, or a file with a 'qsec_config' entry "
        "(ModelCheckpoint(save_weights_only=True) drops callback state: pass config=QuantConfig(...) "
        "with the settings you trained with)"
    )


def _model_state(state: Mapping[str, Any], prefix: str | None) -> tuple[dict[str, Any], str]:
    """The entries under ``prefix`` (detected when ``None``: the one top-level prefix), and the prefix."""
    if prefix is None:
        prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
        if len(prefixes) > 1:
            raise ValueError(
                f"the checkpoint's keys do not match the model and have several top-level prefixes "
                f"{sorted(prefixes)}; pass prefix= the one that holds the model (e.g. 'net.')"
            )
        prefix = prefixes.pop() if prefixes else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


FLOAT_PHASE_KEY = "qsec_float_phase"
"""Set on a checkpoint written in ``QuantizationAwareTraining(float_epochs=...)``'s float epochs."""


def load_quantized_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    map_location: Any = "cpu",
    config: QuantConfig | None = None,
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
        config: the quantization settings, for a checkpoint that does not record them
            (``ModelCheckpoint(save_weights_only=True)`` drops callback state); by default
            the ones the checkpoint records.

    Returns:
        The quantized ``model`` with the checkpoint's weights, scales and bit widths, in eval mode.

    Raises:
        ValueError: a checkpoint that does not fit ``model`` (nothing is quantized then), one
            written in ``QuantizationAwareTraining(float_epochs=...)``'s float epochs, or one
            without quantization settings and no ``config=``.

    Example::

        model = load_quantized_checkpoint(MyLitModule(), "epoch=9.ckpt")  # a QAT checkpoint
    """
    require_float(model, "load_quantized_checkpoint quantizes a new float instance as the checkpoint records")
    checkpoint = safe_load(path, map_location=map_location)
    if checkpoint.get(FLOAT_PHASE_KEY):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} was written in QuantizationAwareTraining's float epochs "
            "(float_epochs=...): its quantizers were never calibrated nor trained; load a checkpoint of a "
            "quantized epoch (or load its weights into the float model with safe_load)"
        )
    if config is None:
        config = find_quant_config(checkpoint)
    state = dict(checkpoint.get("state_dict", checkpoint))
    own = set(model.state_dict())  # the float model's keys: weights, biases, normalisation buffers
    settings = config.to_dict()
    if prefix is not None or not (set(state) >= own and set(state) & own):
        state, prefix = _model_state(state, prefix)
        # globs were recorded for the whole trained module ("net.features.*"): make them the submodule's
        strip = lambda glob: glob[len(prefix):] if prefix and glob.startswith(prefix) else glob  # noqa: E731
        settings["layer_bit_widths"] = {strip(g): b for g, b in settings["layer_bit_widths"].items()}
        settings["skip"] = [strip(g) for g in settings["skip"]]
    # the float weights' names and shapes first: a checkpoint of another model leaves ``model`` float
    float_state = model.state_dict()
    absent = sorted(set(float_state) - set(state))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in float_state.items()
        if k in state and torch.is_tensor(state[k]) and state[k].shape != v.shape
    ]
    if absent or shapes:
        problems = ([f"missing keys {absent}"] if absent else []) + (
            [f"shapes differ (checkpoint vs model): {shapes}"] if shapes else []
        )
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not fit {type(model).__name__}: {'; '.join(problems)}")
    quantize_model(model, **settings)
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
