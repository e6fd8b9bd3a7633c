"""torchmetrics metrics for quantization security.

* :class:`QuantizationDisagreement`: how often the quantized model changes a prediction.
* :class:`RobustAccuracy`: accuracy on adversarial inputs.
* :class:`AttackSuccessRate`: success rate of untargeted or targeted (backdoor) attacks.
* Backdoor metrics (BackdoorBench's definitions): :class:`CleanAccuracy` (accuracy on
  clean samples) and :class:`DefenseEffectivenessRate` (how much a defense lowers the
  attack success rate, net of the clean accuracy it costs).
* Group fairness (fairlearn's definitions, ``method="between_groups"``):
  :class:`GroupAccuracy` (per-group and worst-group accuracy),
  :class:`DemographicParityDifference`, :class:`DemographicParityRatio`,
  :class:`EqualizedOddsDifference`, :class:`EqualOpportunityDifference`, and
  :class:`QuantizationInducedDisparity` (how much more accuracy the worst-hit group
  loses than the average, float -> quantized). Their states are ``(num_groups,)``
  count tensors, sum-reduced, so they are exact under DDP.

Their stateless twins live in :mod:`lightning_qsec.metrics.functional`.
"""

from __future__ import annotations

from lightning_qsec.metrics.attack_success_rate import AttackSuccessRate
from lightning_qsec.metrics.backdoor import CleanAccuracy, DefenseEffectivenessRate
from lightning_qsec.metrics.demographic_parity import DemographicParityDifference, DemographicParityRatio
from lightning_qsec.metrics.disagreement import QuantizationDisagreement
from lightning_qsec.metrics.equalized_odds import EqualizedOddsDifference, EqualOpportunityDifference
from lightning_qsec.metrics.group_accuracy import GroupAccuracy
from lightning_qsec.metrics.quantization_induced_disparity import QuantizationInducedDisparity
from lightning_qsec.metrics.robust_accuracy import RobustAccuracy

__all__ = [
    "AttackSuccessRate",
    "CleanAccuracy",
    "DefenseEffectivenessRate",
    "DemographicParityDifference",
    "DemographicParityRatio",
    "EqualOpportunityDifference",
    "EqualizedOddsDifference",
    "GroupAccuracy",
    "QuantizationDisagreement",
    "QuantizationInducedDisparity",
    "RobustAccuracy",
]
