"""Functional versions of the lightning-qsec metrics: one call on whole tensors, no state.

The group-fairness functions take torchmetrics' argument order ``(preds, target, groups)``
(``quantization_induced_disparity``: ``(float_preds, quant_preds, target, groups)``)
and an optional ``num_groups`` (default ``max(groups) + 1``).
"""

from __future__ import annotations

from lightning_qsec.metrics.functional.attack_success_rate import attack_success_rate
from lightning_qsec.metrics.functional.demographic_parity import (
    demographic_parity_difference,
    demographic_parity_ratio,
    selection_rate,
)
from lightning_qsec.metrics.functional.disagreement import quantization_disagreement
from lightning_qsec.metrics.functional.equalized_odds import equal_opportunity_difference, equalized_odds_difference
from lightning_qsec.metrics.functional.group_accuracy import group_accuracy, worst_group_accuracy
from lightning_qsec.metrics.functional.quantization_induced_disparity import (
    group_accuracy_drop,
    quantization_induced_disparity,
)
from lightning_qsec.metrics.functional.robust_accuracy import robust_accuracy
from lightning_qsec.metrics.functional.backdoor import clean_accuracy, defense_effectiveness_rate

__all__ = [
    "attack_success_rate",
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equal_opportunity_difference",
    "equalized_odds_difference",
    "group_accuracy",
    "group_accuracy_drop",
    "quantization_disagreement",
    "quantization_induced_disparity",
    "robust_accuracy",
    "selection_rate",
    "worst_group_accuracy",
    "clean_accuracy",
    "defense_effectiveness_rate",
]
