"""torchmetrics metrics for quantization security.

* :class:`QuantizationDisagreement`: how often the quantized model changes a prediction.
* :class:`RobustAccuracy`: accuracy on adversarial inputs.
* :class:`AttackSuccessRate`: success rate of untargeted or targeted (backdoor) attacks.

Their stateless twins live in :mod:`lightning_qsec.metrics.functional`.
"""

from __future__ import annotations

from lightning_qsec.metrics.attack_success_rate import AttackSuccessRate
from lightning_qsec.metrics.disagreement import QuantizationDisagreement
from lightning_qsec.metrics.robust_accuracy import RobustAccuracy

__all__ = ["AttackSuccessRate", "QuantizationDisagreement", "RobustAccuracy"]
