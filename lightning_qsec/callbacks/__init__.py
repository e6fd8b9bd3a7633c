"""Lightning callbacks: QAT, precision sweeps, evaluation hooks, backdoor scan and repair, the security report."""

from lightning_qsec.callbacks.backdoor_repair import QuantizationBackdoorRepair
from lightning_qsec.callbacks.backdoor_scan import BackdoorScan
from lightning_qsec.callbacks.fairness_evaluation import FairnessEvaluation
from lightning_qsec.callbacks.membership_inference import MembershipInferenceEvaluation
from lightning_qsec.callbacks.poison_detection import PoisonedDataDetection
from lightning_qsec.callbacks.precision_sweep import PrecisionSweep
from lightning_qsec.callbacks.qat import QuantizationAwareTraining
from lightning_qsec.callbacks.robustness_evaluation import RobustnessEvaluation
from lightning_qsec.callbacks.security_report import SecurityReport

__all__ = [
    "BackdoorScan",
    "FairnessEvaluation",
    "MembershipInferenceEvaluation",
    "PoisonedDataDetection",
    "PrecisionSweep",
    "QuantizationAwareTraining",
    "QuantizationBackdoorRepair",
    "RobustnessEvaluation",
    "SecurityReport",
]
