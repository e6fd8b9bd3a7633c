"""Signs of gradient masking in robustness results: a pure function, unit-testable.

A gradient attack that is blocked by the model, rather than by real robustness, leaves
tell-tale signs (Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018, https://arxiv.org/abs/1802.00420, section 3.1; Carlini et al.,
"On Evaluating Adversarial Robustness", 2019, https://arxiv.org/abs/1902.06705):

(a) a weaker attack beats the white-box one: single-step FGSM reaches a lower robust
    accuracy than iterative PGD/APGD, or inputs crafted on another model (transfer
    float → quantized or quantized → float) beat every white-box attack on the model;
(b) robust accuracy does not fall as eps grows: it rises with eps beyond a tolerance,
    or at the largest eps the strongest attack leaves it within a tolerance of clean
    accuracy;
(c) the loss' gradient with respect to the input is zero for most samples, so gradient
    attacks cannot move the input at all (a non-differentiable preprocessing step,
    rounding without a straight-through estimator, saturated quantizers).

The input is one stage's result of
:class:`~lightning_qsec.callbacks.RobustnessEvaluation` (see its ``results``)::

    {"num_classes": 10, "transfer_eps": 0.1,
     "precisions": {
        "float": {"clean_accuracy": 0.97, "zero_gradient_fraction": 0.0,
                  "attacks": {"pgd": {"0": {"robust_accuracy": 0.97}, "0.1": {...}}, ...}},
        "w4a4": {..., "transfer": {"float_to_quant": {"robust_accuracy": 0.4},
                                   "quant_to_float": {"robust_accuracy": 0.5}}}}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ITERATIVE_ATTACKS",
    "SINGLE_STEP_ATTACKS",
    "effective_tolerance",
    "gradient_masking_flags",
    "masking_flags_by_precision",
]

SINGLE_STEP_ATTACKS: tuple[str, ...] = ("fgsm",)
ITERATIVE_ATTACKS: tuple[str, ...] = ("pgd", "apgd")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _curve(per_eps: Mapping[str, Any]) -> list[tuple[float, float]]:
    """``[(eps, robust accuracy)]`` sorted by eps, finite values only."""
    points = []
    for key, value in per_eps.items():
        e = _number(key)
        acc = _number(value.get("robust_accuracy") if isinstance(value, Mapping) else value)
        if e is not None and acc is not None:
            points.append((e, acc))
    return sorted(points)


def _white_box_at(entry: Mapping[str, Any], eps: float) -> tuple[str, float] | None:
    """The strongest white-box attack at ``eps``: ``(name, robust accuracy)``."""
    best: tuple[str, float] | None = None
    for attack, per_eps in entry.get("attacks", {}).items():
        for e, acc in _curve(per_eps):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12) and (best is None or acc < best[1]):
                best = (attack, acc)
    return best


def _entry_flags(
    label: str,
    entry: Mapping[str, Any],
    results: Mapping[str, Any],
    tolerance: float,
    zero_gradient_fraction: float,
) -> list[str]:
    flags: list[str] = []
    attacks: Mapping[str, Any] = entry.get("attacks", {})
    curves = {attack: _curve(per_eps) for attack, per_eps in attacks.items()}
    clean = _number(entry.get("clean_accuracy"))

    # (a) single-step beats iterative
    for weak in SINGLE_STEP_ATTACKS:
        for strong in ITERATIVE_ATTACKS:
            if weak not in curves or strong not in curves:
                continue
            strong_at = dict(curves[strong])
            for e, acc in curves[weak]:
                if e > 0 and e in strong_at and acc < strong_at[e] - tolerance:
                    flags.append(
                        f"single-step {weak.upper()} beats white-box {strong.upper()} at eps={e:g} "
                        f"(robust accuracy {acc:.3f} vs {strong_at[e]:.3f}): the iterative attack does not "
                        "follow the loss gradient"
                    )
                    break

    # (a) transfer beats white-box
    transfer_eps = _number(results.get("transfer_eps"))
    if transfer_eps is not None:
        white = _white_box_at(entry, transfer_eps)
        sources: list[tuple[str, float]] = []
        if label == "float":
            for other, other_entry in results.get("precisions", {}).items():
                acc = _number(other_entry.get("transfer", {}).get("quant_to_float", {}).get("robust_accuracy"))
                if other != "float" and acc is not None:
                    sources.append((other, acc))
        else:
            acc = _number(entry.get("transfer", {}).get("float_to_quant", {}).get("robust_accuracy"))
            if acc is not None:
                sources.append(("float", acc))
        if white is not None:
            for source, acc in sources:
                if acc < white[1] - tolerance:
                    flags.append(
                        f"transfer from {source} beats white-box {white[0].upper()} at eps={transfer_eps:g} "
                        f"(robust accuracy {acc:.3f} vs {white[1]:.3f}): the white-box gradient is masked"
                    )

    # (b) robust accuracy rises with eps
    for attack, curve in curves.items():
        lowest: tuple[float, float] | None = None
        for e, acc in curve:
            if lowest is not None and acc > lowest[1] + tolerance:
                flags.append(
                    f"robust accuracy under {attack.upper()} rises with eps ({lowest[1]:.3f} at eps={lowest[0]:g}, "
                    f"{acc:.3f} at eps={e:g})"
                )
                break
            if lowest is None or acc < lowest[1]:
                lowest = (e, acc)

    # (b) no fall at the largest eps
    largest = max((e for curve in curves.values() for e, _ in curve if e > 0), default=None)
    num_classes = _number(results.get("num_classes"))
    chance = 1.0 / num_classes if num_classes else 0.0
    if largest is not None and clean is not None and clean > chance + tolerance:
        white = _white_box_at(entry, largest)
        if white is not None and white[1] >= clean - tolerance:
            flags.append(
                f"robust accuracy does not fall: {white[1]:.3f} under the strongest attack ({white[0].upper()}) "
                f"at the largest eps={largest:g}, clean accuracy {clean:.3f}"
            )

    # (c) zero input gradients
    zero = _number(entry.get("zero_gradient_fraction"))
    if zero is not None and zero > zero_gradient_fraction:
        flags.append(
            f"the loss' input gradient is zero for {zero:.0%} of samples: gradient attacks cannot move "
            "them (non-differentiable preprocessing, rounding without a straight-through estimator, "
            "or saturated quantizers)"
        )
    return flags


def effective_tolerance(tolerance: float, num_samples: Any = None) -> float:
    """``max(tolerance, 1 / sqrt(num_samples))``: no flag from sampling noise on a small sample.

    Accuracies on ``n`` samples move in steps of ``1 / n`` and differ between two
    attacks by about ``1 / sqrt(n)`` by chance alone (0.088 on 128 samples, 0.0625 on
    256); a masked gradient leaves far larger gaps.
    """
    n = _number(num_samples)
    return max(float(tolerance), 1.0 / math.sqrt(n)) if n is not None and n >= 1 else float(tolerance)


def masking_flags_by_precision(
    results: Mapping[str, Any],
    *,
    tolerance: float = 0.03,
    zero_gradient_fraction: float = 0.5,
) -> dict[str, list[str]]:
    """Possible gradient masking per precision (``"float"``, ``"w4a4"``, ...).

    Args:
        results: one stage's result of :class:`~lightning_qsec.callbacks.RobustnessEvaluation`
            (see the module docstring for the keys read; missing keys skip a check).
        tolerance: accuracy margin (a fraction) a comparison must exceed to flag; with
            ``results["num_samples"] = n`` the margin is at least ``1 / sqrt(n)``
            (:func:`effective_tolerance`).
        zero_gradient_fraction: flag (c) when more than this fraction of samples has a
            zero input gradient.

    Returns:
        ``{precision: [flag, ...]}``, an empty list where nothing was found.
    """
    for name, value in (("tolerance", tolerance), ("zero_gradient_fraction", zero_gradient_fraction)):
        number = _number(value)
        if number is None or isinstance(value, bool) or not 0.0 <= number <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    precisions = results.get("precisions", {})
    if not isinstance(precisions, Mapping):
        raise ValueError(f"results['precisions'] must be a mapping, got {type(precisions).__name__}")
    margin = effective_tolerance(tolerance, results.get("num_samples"))
    return {
        label: _entry_flags(label, entry, results, margin, float(zero_gradient_fraction))
        for label, entry in precisions.items()
    }


def gradient_masking_flags(
    results: Mapping[str, Any],
    *,
    tolerance: float = 0.03,
    zero_gradient_fraction: float = 0.5,
) -> list[str]:
    """Every sign of gradient masking in ``results``, as ``"<precision>: <why>"`` lines.

    Checks (a) a weaker or transfer attack beating the white-box one, (b) robust
    accuracy not falling with eps, (c) zero input gradients; see the module docstring.

    Args:
        results: one stage's result of :class:`~lightning_qsec.callbacks.RobustnessEvaluation`.
        tolerance: accuracy margin a comparison must exceed to flag (at least
            ``1 / sqrt(results["num_samples"])``).
        zero_gradient_fraction: fraction of zero-gradient samples above which (c) flags.

    Returns:
        The flags; empty when nothing suggests masking.

    Example:
        >>> clean = {"num_classes": 10, "precisions": {"w4a4": {
        ...     "clean_accuracy": 0.95, "zero_gradient_fraction": 0.0,
        ...     "attacks": {"fgsm": {"0": 0.95, "0.1": 0.5, "0.3": 0.1},
        ...                 "pgd": {"0": 0.95, "0.1": 0.3, "0.3": 0.0}}}}}
        >>> gradient_masking_flags(clean)
        []
        >>> masked = {"num_classes": 10, "precisions": {"w2a2": {
        ...     "clean_accuracy": 0.9, "zero_gradient_fraction": 1.0,
        ...     "attacks": {"pgd": {"0": 0.9, "0.1": 0.9, "0.3": 0.9}}}}}
        >>> [flag.split(":")[0] for flag in gradient_masking_flags(masked)]
        ['w2a2', 'w2a2']
    """
    by_precision = masking_flags_by_precision(
        results, tolerance=tolerance, zero_gradient_fraction=zero_gradient_fraction
    )
    return [f"{label}: {flag}" for label, flags in by_precision.items() for flag in flags]
