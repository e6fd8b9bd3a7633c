"""Training-time defenses, added to the Trainer as callbacks (the LightningModule is unchanged).

* :class:`LipschitzRegularization`: Defensive Quantization's orthogonality term
  (Lin, Gan & Han, ICLR 2019).
* :class:`GradientL1Regularization`: L1 norm of the weight gradient, for robustness to
  post-training quantization (Alizadeh et al., ICLR 2020).
* :class:`KurtosisRegularization`: KURE, weights toward a uniform distribution
  (Shkolnik et al., NeurIPS 2020).
* :class:`RandomPrecisionTraining`: every step at a random precision, optionally with
  switchable BatchNorm (Double-Win Quant, Fu et al., ICML 2021).
* :class:`AdversarialTraining`: PGD, fast (FGSM + random start) or TRADES adversarial training.
* :class:`FairQuantizationTraining`: group-balanced distillation from the float model.

Functions (no Lightning needed):

* :func:`fair_mixed_precision`: FairQuanti-style neuron-level mixed-precision PTQ.
* :func:`scan_model`: scan a float model for quantization-conditioned backdoors.
* :func:`repair_quantization_backdoor`: remove them on the deployer's own grid.
* :func:`activation_clustering`, :func:`spectral_signatures`, :func:`detect_poisoned_samples`:
  find poisoned training samples from a model's features.

The regularizers share one mechanism (:mod:`lightning_qsec.defenses._regularizer`):
the term's gradient is added to ``.grad`` by an extra ``torch.autograd.grad``, and the
coefficient is a number or ``(epoch, value)`` milestones.
"""

from lightning_qsec.defenses._regularizer import Coefficient, CoefficientLike
from lightning_qsec.defenses.gradient_l1 import GradientL1Regularization
from lightning_qsec.defenses.kurtosis import KurtosisRegularization
from lightning_qsec.defenses.lipschitz import LipschitzRegularization
from lightning_qsec.defenses.random_precision import RandomPrecisionTraining
from lightning_qsec.defenses.adversarial_training import AdversarialTraining
from lightning_qsec.defenses.fair_quantization import FairQuantizationTraining
from lightning_qsec.defenses.poison_detection import (
    PoisonDetection,
    activation_clustering,
    detect_poisoned_samples,
    spectral_signatures,
)
from lightning_qsec.defenses.backdoor_scan import ScanResult, scan_model
from lightning_qsec.defenses.fair_mixed_precision import (
    FairMixedPrecisionResult,
    NeuronPrecisionSplit,
    fair_mixed_precision,
    neuron_bias_scores,
    quantize_neurons,
)
from lightning_qsec.defenses.repair import RepairReport, RepairResult, repair_quantization_backdoor

__all__ = [
    "Coefficient",
    "CoefficientLike",
    "GradientL1Regularization",
    "KurtosisRegularization",
    "LipschitzRegularization",
    "RandomPrecisionTraining",
    "AdversarialTraining",
    "FairQuantizationTraining",
    "ScanResult",
    "scan_model",
    "FairMixedPrecisionResult",
    "NeuronPrecisionSplit",
    "fair_mixed_precision",
    "neuron_bias_scores",
    "quantize_neurons",
    "RepairReport",
    "RepairResult",
    "repair_quantization_backdoor",
    "PoisonDetection",
    "activation_clustering",
    "detect_poisoned_samples",
    "spectral_signatures",
]
