"""Adversarial attacks that see a quantized model as deployed.

One file per attack, all tensor-native and typed, all running the model in eval mode
with frozen parameters (no BatchNorm or Brevitas statistics consumed, no parameter
``.grad`` written, modes and ``requires_grad`` restored), all usable inside
``torch.inference_mode()`` (Lightning's validation and test loops):

* :func:`fgsm`: Fast Gradient Sign Method (Goodfellow et al., ICLR 2015).
* :func:`pgd`: Projected Gradient Descent, L-infinity or L2, untargeted or targeted
  (Madry et al., ICLR 2018).
* :func:`apgd`: APGD-CE, PGD with an adaptive step size (Croce & Hein, ICML 2020).
* :func:`diva`: fool the quantized model while the float one stays right (Hao et al.,
  MLSys 2022).
* :func:`transfer_attack` / :func:`float_quant_transfer`: craft on one model, evaluate
  on another; float ↔ quantized on one module through :class:`FloatView`.

Red team (attacks on a model's weights or training data rather than on its inputs):

* :func:`add_trigger`, :func:`poison_dataset`, :class:`PoisonedDataModule`: BadNets data
  poisoning (Gu et al., 2017).
* :func:`quantization_conditioned_attack` / :class:`QuantizationConditionedAttack`: a
  float model that misbehaves only once quantized (indiscriminate, targeted or backdoor;
  Egashira et al., NeurIPS 2024 box constraint with Qu-ANTI-zation and PQBackdoor goals);
  :func:`victim_quantize` deploys it as the threat model's victim does.
"""

from __future__ import annotations

from lightning_qsec.attacks._context import Norm, attack_mode
from lightning_qsec.attacks.apgd import apgd
from lightning_qsec.attacks.diva import diva
from lightning_qsec.attacks.fgsm import fgsm
from lightning_qsec.attacks.float_view import FloatView
from lightning_qsec.attacks.pgd import pgd
from lightning_qsec.attacks.poisoning import PoisonedData, PoisonedDataModule, add_trigger, poison_dataset
from lightning_qsec.attacks.quantization_conditioned import (
    QuantizationConditionedAttack,
    quantization_conditioned_attack,
    victim_quantize,
)
from lightning_qsec.attacks.transfer import (
    FloatQuantTransfer,
    TransferResult,
    float_quant_transfer,
    transfer_attack,
)

__all__ = [
    "FloatQuantTransfer",
    "FloatView",
    "Norm",
    "PoisonedData",
    "PoisonedDataModule",
    "QuantizationConditionedAttack",
    "TransferResult",
    "add_trigger",
    "apgd",
    "attack_mode",
    "diva",
    "fgsm",
    "float_quant_transfer",
    "pgd",
    "poison_dataset",
    "quantization_conditioned_attack",
    "transfer_attack",
    "victim_quantize",
]
