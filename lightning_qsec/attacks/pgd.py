"""Projected Gradient Descent (Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec.attacks._checks import (
    check_batch,
    check_count,
    check_domain,
    check_eps,
    check_generator,
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

__all__ = ["pgd"]


def pgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm = "linf",
    random_start: bool = True,
    targeted: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD on the cross-entropy loss, in the L-infinity or L2 ball, returning the last iterate.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018, https://arxiv.org/abs/1706.06083. Each step moves ``alpha`` along the
    steepest-ascent direction of the norm (``sign(g)`` for ``linf``, ``g / ||g||_2``
    for ``l2``), then projects onto the ``eps`` ball around the clean input and clamps
    to the input domain. Untargeted: ascend ``CE(model(x), targets)``. Targeted:
    descend ``CE(model(x), targets)``, where ``targets`` are the attacker's classes.

    Threat model: white-box (gradients of ``model``), ``norm`` ball of radius ``eps``
    intersected with ``[clip_min, clip_max]``. For a quantized model the gradient comes
    through Brevitas' straight-through estimator: the attack sees the fake-quantized
    model as deployed. Run it on ``FloatView(model)`` (or inside
    :func:`~lightning_qsec.float_mode`) to attack the float twin instead.

    The model runs in eval mode with frozen parameters (see
    :func:`~lightning_qsec.attacks._context.attack_mode`): BatchNorm and Brevitas
    statistics are not updated, no parameter ``.grad`` is written, and train/eval flags
    and ``requires_grad`` are restored. Works inside ``torch.inference_mode()``.
    Cost: ``steps`` forward + backward passes (backward to the input only), nothing else
    per step but a few element-wise operations.

    Args:
        model: a classifier mapping ``inputs`` to logits of shape ``(N, C)``.
        inputs: clean inputs of shape ``(N, ...)``, floating point, inside
            ``[clip_min, clip_max]``.
        targets: shape ``(N,)``: true classes (untargeted) or target classes (targeted).
        eps: radius of the ball, in ``[0, diameter of the domain]``.
        alpha: step size, ``> 0`` (in the units of ``norm``).
        steps: number of iterations, ``>= 1``.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform random point of the ball (``linf``: uniform
            per coordinate; ``l2``: random direction, radius uniform in ``[0, eps]``).
        targeted: minimise the loss towards ``targets`` instead of maximising it.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        generator: random generator for the start point (on the device of ``inputs``);
            ``None`` uses PyTorch's global generator. A seeded generator makes the
            result deterministic.

    Returns:
        Detached adversarial inputs with the shape, dtype and device of ``inputs``.

    Raises:
        ValueError: a bad ``eps``, ``alpha``, ``steps``, ``norm``, domain, shape or
            dtype, NaN inputs, or inputs outside the domain; the message names the argument.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec.attacks import pgd
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> g = torch.Generator().manual_seed(0)
        >>> x_adv = pgd(net, x, y, eps=0.1, alpha=0.02, steps=10, generator=g)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
        >>> x_l2 = pgd(net, x, y, eps=1.0, alpha=0.25, steps=10, norm="l2", generator=g)
        >>> bool(((x_l2 - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all())
        True
    """
    norm = check_norm(norm)
    clip_min, clip_max = check_domain(clip_min, clip_max)
    check_batch(inputs, targets, clip_min, clip_max)
    eps = check_eps(eps, norm, inputs, clip_min, clip_max)
    alpha = check_step_size(alpha, "alpha")
    steps = check_count(steps, "steps")
    generator = check_generator(generator, inputs)
    direction = -1.0 if targeted else 1.0
    with attack_mode(model):
        x = as_attack_tensor(inputs)
        y = as_attack_tensor(targets).long()
        if x.shape[0] == 0:
            return x.clone()
        if norm == "linf":
            # projection onto the ball and clamping to the domain in one clamp per step
            low = torch.clamp(x - eps, min=clip_min)
            high = torch.clamp(x + eps, max=clip_max)
        x_adv = x.clone()
        if random_start:
            x_adv = torch.clamp(x + draw_random_start(x, eps, norm, generator), clip_min, clip_max)
        for step in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if step == 0:
                check_logits(logits, x.shape[0], y, "pgd")
            grad = input_gradient(F.cross_entropy(logits, y, reduction="sum"), x_adv)
            del logits  # the graph of this step must not live through the next forward (measured ~5 % slower)
            x_adv = x_adv.detach()
            if norm == "linf":
                x_adv = torch.clamp(x_adv.add_(grad.sign_(), alpha=direction * alpha), low, high)
            else:
                grad = grad / l2_norms(grad).clamp_min(1e-12)
                delta = project_l2(x_adv.add_(grad, alpha=direction * alpha).sub_(x), eps)
                x_adv = torch.clamp(x + delta, clip_min, clip_max)
                del delta
            del grad
        return x_adv.detach()
