"""DIVA: a differential attack that fools the quantized model and not its float original."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec.attacks._checks import (
    check_batch,
    check_count,
    check_domain,
    check_eps,
    check_generator,
    check_nonnegative,
    check_norm,
    check_step_size,
)
from lightning_qsec.attacks._context import (
    Norm,
    as_attack_tensor,
    attack_mode,
    check_logits,
    input_gradient,
    l2_norms,
    project_l2,
)
from lightning_qsec.attacks._context import (
    random_start as draw_random_start,
)
from lightning_qsec.attacks.float_view import float_side

__all__ = ["diva"]

DivaLoss = Literal["prob", "ce"]


def _objective(float_logits: Tensor, quant_logits: Tensor, y: Tensor, c: float, loss: DivaLoss) -> Tensor:
    """Per-sample DIVA objective, to maximise."""
    if loss == "prob":
        p_float = F.softmax(float_logits, dim=1).gather(1, y[:, None]).squeeze(1)
        p_quant = F.softmax(quant_logits, dim=1).gather(1, y[:, None]).squeeze(1)
        return p_float - c * p_quant
    return c * F.cross_entropy(quant_logits, y, reduction="none") - F.cross_entropy(float_logits, y, reduction="none")


def diva(
    float_model: nn.Module,
    quant_model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    c: float = 1.0,
    loss: DivaLoss = "prob",
    norm: Norm = "linf",
    random_start: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DIVA: make the quantized model wrong while its float original stays right.

    Hao et al., "A Tale of Two Models: Constructing Evasive Attacks on Edge Models",
    MLSys 2022, https://arxiv.org/abs/2204.10933. The deployed (quantized) model is
    attacked while the float model it was derived from, which serves for validation
    and monitoring, keeps answering right, so the attack goes unnoticed there.
    Projected sign-gradient ascent (as PGD) on the paper's objective

    ``loss="prob"`` (the paper's form): ``p_float(y | x) - c * p_quant(y | x)``, the
    softmax probabilities of the true class;

    ``loss="ce"`` (a log-space variant, stronger when softmax saturates):
    ``c * CE(quant(x), y) - CE(float(x), y)``.

    As in the authors' code, a sample stops at the first iterate where the float model
    is right and the quantized one wrong; that iterate is returned. Samples never
    reaching that state return their last iterate.

    Threat model: white-box on both models, untargeted for the quantized model, ``norm``
    ball of radius ``eps`` intersected with ``[clip_min, clip_max]``. The quantized
    gradient comes through the straight-through estimator.

    ``float_model`` and ``quant_model`` may be the same module: a quantized model and
    its float twin are one module in two modes, so the float side is then run inside
    :func:`~lightning_qsec.float_mode` (through
    :class:`~lightning_qsec.attacks.FloatView`). Both models run in eval mode with frozen
    parameters (see :func:`~lightning_qsec.attacks._context.attack_mode`): no BatchNorm
    or Brevitas statistics are updated, no parameter ``.grad`` is written, and modes and
    ``requires_grad`` are restored. Works inside ``torch.inference_mode()``.
    Cost per step: one forward of each model and one backward through both.

    Args:
        float_model: the original float model (logits ``(N, C)``), or ``quant_model``
            itself to use its float mode.
        quant_model: the quantized (deployed) model, logits ``(N, C)``.
        inputs: clean inputs of shape ``(N, ...)``, floating point, inside
            ``[clip_min, clip_max]``.
        targets: true class indices of shape ``(N,)``.
        eps: radius of the ball, in ``[0, diameter of the domain]``.
        alpha: step size, ``> 0``.
        steps: iterations, ``>= 1``.
        c: weight of the quantized-model term, ``>= 0`` (the paper uses 1).
        loss: ``"prob"`` (the paper's softmax difference) or ``"ce"``.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a random point of the ball (the paper starts at ``x``).
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        generator: random generator for ``random_start``; ``None`` uses the global one.

    Returns:
        Detached adversarial inputs with the shape, dtype and device of ``inputs``.

    Raises:
        ValueError: a bad ``eps``, ``alpha``, ``steps``, ``c``, ``loss``, ``norm``,
            domain, shape or dtype, NaN inputs, inputs outside the domain, or
            ``float_model is quant_model`` for a model without quantized layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model
        >>> from lightning_qsec.attacks import diva
        >>> net = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), weight_bit_width=4).eval()
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> x_adv = diva(net, net, x, y, eps=0.1, alpha=0.01, steps=10)  # float side: float_mode(net)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    norm = check_norm(norm)
    if loss not in ("prob", "ce"):
        raise ValueError(f"loss must be 'prob' or 'ce', got {loss!r}")
    clip_min, clip_max = check_domain(clip_min, clip_max)
    check_batch(inputs, targets, clip_min, clip_max)
    eps = check_eps(eps, norm, inputs, clip_min, clip_max)
    alpha = check_step_size(alpha, "alpha")
    steps = check_count(steps, "steps")
    c = check_nonnegative(c, "c")
    generator = check_generator(generator, inputs)
    float_net = float_side(float_model, quant_model)
    view = (-1,) + (1,) * (inputs.ndim - 1)
    with attack_mode(float_net, quant_model):
        x = as_attack_tensor(inputs)
        y = as_attack_tensor(targets).long()
        if x.shape[0] == 0:
            return x.clone()
        x_adv = x.clone()
        if random_start:
            x_adv = torch.clamp(x + draw_random_start(x, eps, norm, generator), clip_min, clip_max)
        result = x_adv.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for step in range(steps + 1):  # the last pass only checks the final iterate
            x_adv.requires_grad_(step < steps)
            float_logits = float_net(x_adv)
            quant_logits = quant_model(x_adv)
            if step == 0:
                check_logits(float_logits, x.shape[0], y, "diva (float_model)")
                check_logits(quant_logits, x.shape[0], y, "diva (quant_model)")
            success = (float_logits.detach().argmax(1) == y) & (quant_logits.detach().argmax(1) != y) & ~done
            result[success] = x_adv.detach()[success]
            done |= success
            if step == steps or bool(done.all()):
                break
            grad = input_gradient(_objective(float_logits, quant_logits, y, c, loss).sum(), x_adv)
            del float_logits, quant_logits  # no graph lives through the next forward
            grad = torch.where(done.view(view), torch.zeros_like(grad), grad)  # finished samples stay put
            x_adv = x_adv.detach()
            if norm == "linf":
                x_adv = x_adv + alpha * grad.sign()
                x_adv = torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), clip_min, clip_max)
            else:
                x_adv = x_adv + alpha * grad / l2_norms(grad).clamp_min(1e-12)
                x_adv = torch.clamp(x + project_l2(x_adv - x, eps), clip_min, clip_max)
        result[~done] = x_adv.detach()[~done]
        return result.detach()
