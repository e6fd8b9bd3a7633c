"""Functional versions of the lightning-qsec metrics: one call on whole tensors, no state."""

from __future__ import annotations

from lightning_qsec.metrics.functional.attack_success_rate import attack_success_rate
from lightning_qsec.metrics.functional.disagreement import quantization_disagreement
from lightning_qsec.metrics.functional.robust_accuracy import robust_accuracy

__all__ = ["attack_success_rate", "quantization_disagreement", "robust_accuracy"]
