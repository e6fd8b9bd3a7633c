"""Transfer evaluation: craft adversarial inputs on one model, evaluate them on another."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_qsec.attacks._context import as_attack_tensor, attack_mode
from lightning_qsec.attacks.apgd import apgd
from lightning_qsec.attacks.fgsm import fgsm
from lightning_qsec.attacks.float_view import FloatView
from lightning_qsec.attacks.pgd import pgd

__all__ = ["AttackFn", "FloatQuantTransfer", "TransferResult", "float_quant_transfer", "transfer_attack"]

AttackFn = Callable[..., Tensor]
AttackName = Literal["fgsm", "pgd", "apgd"]
ATTACKS: dict[str, AttackFn] = {"fgsm": fgsm, "pgd": pgd, "apgd": apgd}


@dataclass(frozen=True)
class TransferResult:
    """What one transfer experiment measured. Rates are floats in ``[0, 1]``, ``nan`` without a denominator.

    Attributes:
        adversarial: the inputs crafted on the source, shape of the clean inputs.
        source_clean_accuracy: accuracy of the source model on the clean inputs.
        target_clean_accuracy: accuracy of the target model on the clean inputs.
        source_robust_accuracy: accuracy of the source on ``adversarial`` (white-box).
        target_robust_accuracy: accuracy of the target on ``adversarial`` (transfer).
        source_success_rate: among samples the source gets right on clean input, the
            fraction it gets wrong on ``adversarial``.
        target_success_rate: the same for the target model.
        transfer_rate: among samples both models get right on clean input and the
            source gets wrong on ``adversarial``, the fraction the target also gets wrong.
        num_samples: ``N``.
    """

    adversarial: Tensor
    source_clean_accuracy: float
    target_clean_accuracy: float
    source_robust_accuracy: float
    target_robust_accuracy: float
    source_success_rate: float
    target_success_rate: float
    transfer_rate: float
    num_samples: int

    def as_dict(self) -> dict[str, float | int]:
        """The numbers (everything but ``adversarial``), for logging or a report."""
        return {k: v for k, v in self.__dict__.items() if k != "adversarial"}


@dataclass(frozen=True)
class FloatQuantTransfer:
    """Transfer both ways between a quantized model and its float mode.

    Attributes:
        float_to_quant: crafted on the float model, evaluated on the quantized one.
        quant_to_float: crafted on the quantized model, evaluated on the float one.
    """

    float_to_quant: TransferResult
    quant_to_float: TransferResult


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    den = int(denominator.sum())
    return float(numerator.sum()) / den if den else math.nan


def _predict(model: nn.Module, inputs: Tensor) -> Tensor:
    with attack_mode(model), torch.no_grad():
        return model(as_attack_tensor(inputs)).argmax(1)


def _resolve(attack: AttackName | AttackFn) -> AttackFn:
    if callable(attack):
        return attack
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(repr(a) for a in ATTACKS)} or a callable, got {attack!r}")
    return ATTACKS[attack]


def transfer_attack(
    source_model: nn.Module,
    target_model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    attack: AttackName | AttackFn = "pgd",
    **attack_kwargs: Any,
) -> TransferResult:
    """Craft adversarial inputs on ``source_model`` and measure how they fool ``target_model``.

    The transfer setting of Papernot et al. (https://arxiv.org/abs/1605.07277): the
    attacker has gradients of the source only. Between a quantized model and its float
    twin, imperfect transfer is expected (Bernhard et al. 2019,
    https://arxiv.org/abs/1909.12741) and is what DIVA exploits. A target robust
    accuracy well below the white-box one of the target itself suggests gradient
    masking on the target.

    Both models are evaluated in eval mode; their modes and ``requires_grad`` are
    restored. Works inside ``torch.inference_mode()``.

    Args:
        source_model: the model the attack differentiates (logits ``(N, C)``).
        target_model: the model the adversarial inputs are evaluated on.
        inputs: clean inputs ``(N, ...)``.
        targets: true class indices ``(N,)``.
        attack: ``"fgsm"``, ``"pgd"``, ``"apgd"``, or any callable
            ``attack(model, inputs, targets, **attack_kwargs) -> adversarial inputs``.
        **attack_kwargs: passed to the attack (``eps``, ``alpha``, ``steps``, ...).

    Returns:
        A :class:`TransferResult`.

    Raises:
        ValueError: an unknown ``attack``, or any error of the attack itself.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec.attacks import transfer_attack
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> a, b = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> r = transfer_attack(a, b, x, y, attack="fgsm", eps=0.1)
        >>> 0.0 <= r.target_robust_accuracy <= 1.0
        True
    """
    run = _resolve(attack)
    adversarial = run(source_model, inputs, targets, **attack_kwargs)
    with torch.inference_mode(False):
        y = as_attack_tensor(targets).long()
        src_clean = _predict(source_model, inputs) == y
        tgt_clean = _predict(target_model, inputs) == y
        src_adv = _predict(source_model, adversarial) == y
        tgt_adv = _predict(target_model, adversarial) == y
    n = int(y.shape[0])
    both = src_clean & tgt_clean & ~src_adv
    return TransferResult(
        adversarial=adversarial,
        source_clean_accuracy=_ratio(src_clean, torch.ones_like(src_clean)),
        target_clean_accuracy=_ratio(tgt_clean, torch.ones_like(tgt_clean)),
        source_robust_accuracy=_ratio(src_adv, torch.ones_like(src_adv)),
        target_robust_accuracy=_ratio(tgt_adv, torch.ones_like(tgt_adv)),
        source_success_rate=_ratio(src_clean & ~src_adv, src_clean),
        target_success_rate=_ratio(tgt_clean & ~tgt_adv, tgt_clean),
        transfer_rate=_ratio(both & ~tgt_adv, both),
        num_samples=n,
    )


def float_quant_transfer(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    attack: AttackName | AttackFn = "pgd",
    **attack_kwargs: Any,
) -> FloatQuantTransfer:
    """Transfer float → quantized and quantized → float on one quantized model.

    The float model is ``model`` in :func:`~lightning_qsec.float_mode` (through
    :class:`~lightning_qsec.attacks.FloatView`), the quantized one is ``model`` as it is:
    the same module and weights in two modes. Crafting "on float" runs the attack's
    forward and backward passes with quantization off.

    A ``generator`` in ``attack_kwargs`` is copied, so that both directions draw the
    same random start and the result does not depend on the order of the two runs.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quantize_model`.
        inputs: clean inputs ``(N, ...)``.
        targets: true class indices ``(N,)``.
        attack: as in :func:`transfer_attack`.
        **attack_kwargs: passed to the attack.

    Returns:
        A :class:`FloatQuantTransfer` with both directions.

    Raises:
        ValueError: ``model`` has no quantized layers, an unknown ``attack``, or any
            error of the attack itself.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model
        >>> from lightning_qsec.attacks import float_quant_transfer
        >>> net = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), weight_bit_width=4).eval()
        >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> both = float_quant_transfer(net, x, y, attack="fgsm", eps=0.1)
        >>> sorted(both.float_to_quant.as_dict())[:2]
        ['num_samples', 'source_clean_accuracy']
    """
    float_model = FloatView(model)
    return FloatQuantTransfer(
        float_to_quant=transfer_attack(float_model, model, inputs, targets, attack=attack, **_fresh(attack_kwargs)),
        quant_to_float=transfer_attack(model, float_model, inputs, targets, attack=attack, **_fresh(attack_kwargs)),
    )


def _fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a copy of its ``generator`` (same state), if it holds one."""
    generator = kwargs.get("generator")
    if not isinstance(generator, torch.Generator):
        return kwargs
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return {**kwargs, "generator": twin}
