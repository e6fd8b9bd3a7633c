"""Argument checks of :func:`~lightning_qsec.defenses.scan_model`, shared with the :class:`~lightning_qsec.callbacks.BackdoorScan` hook.

Both call :func:`scan_settings`, so a bad setting is refused when the hook is built,
not later inside the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_qsec._validation import check_bit_width, check_positive_int, check_seed
from lightning_qsec.defenses._scan_thresholds import check_thresholds, thresholds_for
from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.weight_grid import WEIGHT_QUANTIZERS, WeightQuantizer

__all__ = ["Quantizer", "ScanSettings", "scan_settings"]

Quantizer = WeightQuantizer


@dataclass(frozen=True)
class ScanSettings:
    """The checked settings of one scan (see :func:`~lightning_qsec.defenses.scan_model` for each)."""

    bit_widths: list[int]
    config: QuantConfig
    seed: int
    max_samples: int
    calibrate_batches: int
    trigger_samples: int
    trigger_steps: int
    trigger_lr: float
    trigger_cost: float
    strip_overlays: int
    thresholds: dict[int, dict[str, float]]


def _deployer_config(quantizer: Any, act_bit_width: Any) -> QuantConfig:
    if isinstance(quantizer, QuantConfig):
        if act_bit_width is not None:
            raise ValueError(
                "act_bit_width must be left out when quantizer is a QuantConfig (its act_bit_width is the deployer's)"
            )
        return quantizer
    if quantizer not in WEIGHT_QUANTIZERS:
        raise ValueError(
            f"quantizer must be a QuantConfig or one of {', '.join(repr(q) for q in WEIGHT_QUANTIZERS)}, got {quantizer!r}"
        )
    acts = check_bit_width(8 if act_bit_width is None else act_bit_width, "act_bit_width")
    return QuantConfig(act_bit_width=acts, per_channel=quantizer == "per_channel")


def _check_bit_widths(bit_widths: Any) -> list[int]:
    if isinstance(bit_widths, (str, bytes)) or not isinstance(bit_widths, Sequence) or len(bit_widths) == 0:
        raise ValueError(f"bit_widths must be a non-empty sequence of integers from 2 to 16, got {bit_widths!r}")
    return list(dict.fromkeys(check_bit_width(b, "bit_widths") for b in bit_widths))


def _positive_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def scan_settings(
    *,
    bit_widths: Sequence[int] = (8, 4),
    quantizer: QuantConfig | Quantizer = "per_tensor",
    act_bit_width: int | None = None,
    seed: int = 0,
    max_samples: int = 512,
    calibrate_batches: int = 10,
    trigger_samples: int = 10,
    trigger_steps: int = 50,
    trigger_lr: float = 0.2,
    trigger_cost: float = 1.0,
    strip_overlays: int = 8,
    thresholds: Mapping[int, Mapping[str, float]] | None = None,
) -> ScanSettings:
    """Check the settings of a scan and return them normalised.

    The defaults are those of :func:`~lightning_qsec.defenses.scan_model`.

    Raises:
        ValueError: naming the bad argument and its allowed values.

    Example:
        >>> s = scan_settings(bit_widths=[4, 8, 4], quantizer="per_channel")
        >>> s.bit_widths, s.config.per_channel
        ([4, 8], True)
    """
    bits = _check_bit_widths(bit_widths)
    config = _deployer_config(quantizer, act_bit_width)
    check_seed(seed)
    thresholds = check_thresholds(thresholds, bits)
    return ScanSettings(
        bit_widths=bits,
        config=config,
        seed=seed,
        max_samples=check_positive_int(max_samples, "max_samples"),
        calibrate_batches=check_positive_int(calibrate_batches, "calibrate_batches"),
        trigger_samples=check_positive_int(trigger_samples, "trigger_samples"),
        trigger_steps=check_positive_int(trigger_steps, "trigger_steps"),
        trigger_lr=_positive_number(trigger_lr, "trigger_lr"),
        trigger_cost=_positive_number(trigger_cost, "trigger_cost"),
        strip_overlays=check_positive_int(strip_overlays, "strip_overlays"),
        thresholds={b: thresholds_for(b, thresholds) for b in bits},
    )
