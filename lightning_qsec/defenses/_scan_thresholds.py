"""Calibrated thresholds of :func:`~lightning_qsec.defenses.scan_model`, and the rule that made them.

**Calibration (clean models only).** ``benchmarks/backdoor_scan.py --calibrate`` trains
clean ``DigitsCNN`` (digits, 20 epochs) and ``MNISTCNN`` (MNIST-5k, 5 epochs) models on
seeds 100, 101, ... (disjoint from the evaluation seeds 0-9 of the benchmark), scans each
with the defaults of :func:`~lightning_qsec.defenses.scan_model` (per-tensor weights,
8-bit activations, bit widths 8 and 4, seed 0) and prints, for every evidence and bit
width, ``threshold = max(FLOORS[evidence], MARGIN * max over the clean models)``
(:func:`calibrated_threshold`). Those printed values are :data:`CALIBRATED` below. No
attacked model is used.

The floors are the smallest effects the scan calls an attack at all; they keep a
threshold from collapsing to zero where every clean model measured exactly 0 (e.g. no
prediction flips at 8 bits). ``trigger_anomaly``'s floor is Neural Cleanse's own
threshold of 2 (Wang et al., S&P 2019); the clean models set it higher.
``truncation_outliers`` is 0 unless at least 3 neurons are outliers at a Bonferroni-
corrected level (:func:`~lightning_qsec.defenses._scan_evidence.truncation_evidence`),
so its 1 % floor is no longer reached by a single noisy neuron (a clean MNIST-5k model,
evaluation seed 6, was flagged that way with the earlier per-neuron test).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CALIBRATED", "EVIDENCE", "FLOORS", "MARGIN", "calibrated_threshold", "check_thresholds", "thresholds_for",
]

#: The evidence names, in report order.
EVIDENCE: tuple[str, ...] = (
    "disagreement",
    "class_shift",
    "truncation_outliers",
    "truncation_ks",
    "trigger_ratio",
    "trigger_anomaly",
    "strip_drop",
)

#: Smallest threshold per evidence (see the module docstring).
FLOORS: dict[str, float] = {
    "disagreement": 0.02,  # 2 % of clean predictions change
    "class_shift": 0.02,  # 2 % of the predicted-class mass moves
    "truncation_outliers": 0.01,  # 1 % of the neurons (and at least 3 of them, see truncation_evidence)
    "truncation_ks": 0.03,  # KS distance of the rounding residuals from uniform
    "trigger_ratio": 0.2,  # the quantized trigger is 18 % smaller than the float one
    "trigger_anomaly": 2.0,  # Neural Cleanse's own outlier threshold (Wang et al. 2019)
    "strip_drop": 0.05,  # 5 % of the maximal entropy
}

#: Safety factor over the largest clean value.
MARGIN = 1.5

#: Thresholds per weight bit width, printed by
#: ``.venv/bin/python benchmarks/backdoor_scan.py --calibrate --data digits`` and
#: ``... --calibrate --data mnist5k`` (8 clean models per dataset, seeds 100-107; the
#: larger of the two datasets' thresholds, here digits' for every evidence; 2026-11-26,
#: after ``trigger_anomaly`` and the Bonferroni/3-neuron ``truncation_outliers`` were
#: added). At 8 bits every clean value except ``trigger_anomaly`` stayed under its floor
#: (``truncation_outliers`` was 0 for all 16 clean models at 8 bits and all 8 MNIST-5k ones
#: at 4 bits); clean ``trigger_anomaly`` reached 1.74 (8 bits) and 1.81 (4 bits).
CALIBRATED: dict[int, dict[str, float]] = {
    8: {"disagreement": 0.0200, "class_shift": 0.0200, "truncation_outliers": 0.0100, "truncation_ks": 0.0300,
        "trigger_ratio": 0.2000, "trigger_anomaly": 2.6074, "strip_drop": 0.0500},
    4: {"disagreement": 0.0944, "class_shift": 0.0833, "truncation_outliers": 0.0615, "truncation_ks": 0.0750,
        "trigger_ratio": 0.2075, "trigger_anomaly": 2.7208, "strip_drop": 0.0673},
}


def calibrated_threshold(values: Sequence[float], evidence: str) -> float:
    """The calibration rule: ``max(FLOORS[evidence], MARGIN * max(values))`` over clean models."""
    return max(FLOORS[evidence], MARGIN * max(values))


def thresholds_for(bits: int, overrides: Mapping[int, Mapping[str, float]] | None = None) -> dict[str, float]:
    """The thresholds used at weight bit width ``bits``.

    ``overrides[bits]`` wins where given. Otherwise a calibrated width is used as is;
    9-16 bits use the 8-bit thresholds, 5-7 bits the 4-bit ones, and 2-3 bits the 4-bit
    ones with a warning: no clean model was calibrated there, and a clean model
    quantized that coarsely may be flagged.
    """
    if bits in CALIBRATED:
        base = CALIBRATED[bits]
    else:
        below = [b for b in CALIBRATED if b <= bits]
        if below:
            base = CALIBRATED[max(below)]
        else:
            base = CALIBRATED[min(CALIBRATED)]
            warnings.warn(
                f"scan_model: no thresholds were calibrated at {bits} bits (calibrated: {sorted(CALIBRATED)}); "
                f"using those of {min(CALIBRATED)} bits, so a clean model may be flagged. Pass thresholds= to set "
                "them.",
                UserWarning,
                stacklevel=3,
            )
    out = dict(base)
    if overrides and bits in overrides:
        out.update({k: float(v) for k, v in overrides[bits].items()})
    return out


def check_thresholds(
    thresholds: Any, bit_widths: Sequence[int]
) -> Mapping[int, Mapping[str, float]] | None:
    """Return ``thresholds`` if it is ``None`` or a valid ``bit width -> evidence -> threshold`` mapping.

    Keys are integer bit widths among ``bit_widths``, evidence names are those of
    :data:`EVIDENCE`, and each threshold is a finite number > 0 (every evidence is
    divided by its threshold).

    Raises:
        ValueError: naming the bad entry (``thresholds[<bits>][<evidence>]``) and what is allowed.

    Example:
        >>> check_thresholds({4: {"disagreement": 0.1}}, [8, 4])
        {4: {'disagreement': 0.1}}
    """
    if thresholds is None:
        return None
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"thresholds must be a mapping bit width -> evidence name -> threshold, got {thresholds!r}")
    for bits, limits in thresholds.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in bit_widths:
            raise ValueError(
                f"thresholds keys must be integer bit widths among bit_widths {list(bit_widths)}, got {bits!r}"
            )
        if not isinstance(limits, Mapping):
            raise ValueError(f"thresholds[{bits}] must be a mapping evidence name -> threshold, got {limits!r}")
        unknown = set(limits) - set(EVIDENCE)
        if unknown:
            raise ValueError(f"thresholds[{bits}] has unknown evidence {sorted(unknown)}; allowed: {list(EVIDENCE)}")
        for evidence, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"thresholds[{bits}][{evidence!r}] must be a finite number > 0, got {value!r}")
    return thresholds
