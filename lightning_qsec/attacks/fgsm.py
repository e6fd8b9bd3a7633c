"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec.attacks._checks import check_batch, check_domain, check_eps
from lightning_qsec.attacks._context import as_attack_tensor, attack_mode, check_logits, input_gradient

__all__ = ["fgsm"]


def fgsm(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    eps: float,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
) -> Tensor:
    """Untargeted FGSM: one step of size ``eps`` along the sign of the loss gradient.

    Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015, https://arxiv.org/abs/1412.6572:
    ``x_adv = clip(x + eps * sign(grad_x CE(model(x), y)), clip_min, clip_max)``.

    Threat model: white-box (gradients of ``model``), untargeted, L-infinity ball of
    radius ``eps`` intersected with the input domain. For a quantized model the
    gradient comes through Brevitas' straight-through estimator, i.e. the attack sees
    the model as deployed (fake-quantized).

    The model runs in eval mode with frozen parameters (see
    :func:`~lightning_qsec.attacks._context.attack_mode`): BatchNorm and Brevitas
    statistics are not updated, no parameter ``.grad`` is written, and train/eval flags
    and ``requires_grad`` are restored. Works inside ``torch.inference_mode()``.
    Deterministic (no randomness). Cost: one forward and one backward pass.

    Args:
        model: a classifier mapping ``inputs`` to logits of shape ``(N, C)``.
        inputs: clean inputs of shape ``(N, ...)``, floating point, inside
            ``[clip_min, clip_max]``.
        targets: true class indices of shape ``(N,)``.
        eps: L-infinity radius, in ``[0, clip_max - clip_min]``.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.

    Returns:
        Detached adversarial inputs with the shape, dtype and device of ``inputs``.

    Raises:
        ValueError: a bad ``eps``, domain, shape or dtype, NaN inputs, or inputs outside
            the domain; the message names the argument.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec.attacks import fgsm
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> x_adv = fgsm(net, x, y, eps=0.1)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), x_adv.shape == x.shape
        (True, True)
    """
    clip_min, clip_max = check_domain(clip_min, clip_max)
    check_batch(inputs, targets, clip_min, clip_max)
    eps = check_eps(eps, "linf", inputs, clip_min, clip_max)
    with attack_mode(model):
        x = as_attack_tensor(inputs)
        y = as_attack_tensor(targets).long()
        if x.shape[0] == 0:
            return x.clone()
        x_in = x.clone().requires_grad_(True)
        logits = check_logits(model(x_in), x.shape[0], y, "fgsm")
        grad = input_gradient(F.cross_entropy(logits, y, reduction="sum"), x_in)
        return torch.clamp(x + eps * grad.sign(), clip_min, clip_max).detach()
