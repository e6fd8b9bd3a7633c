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
prediction flips at 8 bits).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

__all__ = ["CALIBRATED", "EVIDENCE", "FLOORS", "MARGIN", "calibrated_threshold", "thresholds_for"]

#: The evidence names, in report order.
EVIDENCE: tuple[str, ...] = (
    "disagreement",
    "class_shift",
    "truncation_outliers",
    "truncation_ks",
    "trigger_ratio",
    "strip_drop",
)

#: Smallest threshold per evidence (see the module docstring).
FLOORS: dict[str, float] = {
    "disagreement": 0.02,  # 2 % of clean predictions change
    "class_shift": 0.02,  # 2 % of the predicted-class mass moves
    "truncation_outliers": 0.01,  # 1 % of the neurons
    "truncation_ks": 0.03,  # KS distance of the rounding residuals from uniform
    "trigger_ratio": 0.2,  # the quantized trigger is 18 % smaller than the float one
    "strip_drop": 0.05,  # 5 % of the maximal entropy
}

#: Safety factor over the largest clean value.
MARGIN = 1.5

#: Thresholds per weight bit width, printed by ``benchmarks/backdoor_scan.py --calibrate``
#: (8 clean models per dataset, seeds 100-107, digits and MNIST-5k; the larger of the two
#: datasets' thresholds; 2026-11-26). At 8 bits every clean value stayed under its floor.
CALIBRATED: dict[int, dict[str, float]] = {
    8: {"disagreement": 0.0200, "class_shift": 0.0200, "truncation_outliers": 0.0100, "truncation_ks": 0.0300,
        "trigger_ratio": 0.2000, "strip_drop": 0.0500},
    4: {"disagreement": 0.0944, "class_shift": 0.0833, "truncation_outliers": 0.0738, "truncation_ks": 0.0750,
        "trigger_ratio": 0.2075, "strip_drop": 0.0673},
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
        unknown = set(overrides[bits]) - set(EVIDENCE)
        if unknown:
            raise ValueError(f"thresholds[{bits}] has unknown evidence {sorted(unknown)}; allowed: {list(EVIDENCE)}")
        out.update({k: float(v) for k, v in overrides[bits].items()})
    return out
