"""Auto-PGD with the cross-entropy loss, APGD-CE (Croce & Hein, ICML 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec._validation import check_seed
from lightning_qsec.attacks._checks import (
    check_batch,
    check_count,
    check_domain,
    check_eps,
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

__all__ = ["apgd", "apgd_checkpoints"]


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step size (Croce & Hein 2020, Sec. 3.2).

    ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, kept while ``w_j <= steps``.

    Example:
        >>> apgd_checkpoints(100)
        [0, 22, 41, 57, 70, 80, 87, 93, 99]
    """
    points = [0.0, 0.22]
    while True:
        step = max(points[-1] - points[-2] - 0.03, 0.06)
        if points[-1] + step > 1.0:
            break
        points.append(points[-1] + step)
    marks: list[int] = []
    for p in points:
        w = math.ceil(round(p * steps, 9))
        if w <= steps and (not marks or w > marks[-1]):
            marks.append(w)
    return marks


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: Norm, clip_min: float, clip_max: float) -> Tensor:
    if norm == "linf":
        return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), clip_min, clip_max)
    return torch.clamp(x + project_l2(x_adv - x, eps), clip_min, clip_max)


def _ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / l2_norms(grad).clamp_min(1e-12)


def apgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: Norm = "linf",
    n_restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    seed: int = 0,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
) -> Tensor:
    """APGD-CE: PGD with momentum and a step size that adapts itself, no step to tune.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690
    (Algorithm 1, the attack inside AutoAttack). Per sample:

    * start at a random point of the ball; step size ``eta = 2 * eps``;
    * ``z = P(x_k + eta * s(grad))`` with ``s = sign`` (``linf``) or ``g / ||g||_2``
      (``l2``), then ``x_{k+1} = P(x_k + momentum * (z - x_k) + (1 - momentum) *
      (x_k - x_{k-1}))`` (plain step at ``k = 0``); ``P`` projects onto the ball and the
      input domain;
    * at the checkpoints :func:`apgd_checkpoints` ``w_j``, halve ``eta`` and restart
      from the best point so far if (1) the loss increased in fewer than
      ``rho * (w_j - w_{j-1})`` of the steps since ``w_{j-1}``, or (2) neither ``eta``
      nor the best loss changed since ``w_{j-1}`` (as in the paper, condition 2 is also
      checked at the first checkpoint, against the start point).

    Samples the model already misclassifies are returned unchanged. With
    ``n_restarts > 1``, further runs from new random points attack only the samples
    not yet misclassified. Returned per sample: the first misclassified iterate found,
    else the iterate of highest loss (the paper's ``x_max``).

    Threat model: white-box, untargeted, ``norm`` ball of radius ``eps`` intersected
    with ``[clip_min, clip_max]``. For a quantized model the gradient comes through the
    straight-through estimator (the model as deployed). APGD is the stronger check of
    robust accuracy; PGD with a fixed step can overestimate it.

    The model runs in eval mode with frozen parameters (see
    :func:`~lightning_qsec.attacks._context.attack_mode`), so BatchNorm and Brevitas
    statistics are not updated and no parameter ``.grad`` is written; train/eval flags
    and ``requires_grad`` are restored. Works inside ``torch.inference_mode()``.
    Deterministic for a given ``seed``. Cost: ``n_restarts * (steps + 1)`` forward +
    backward passes at most.

    Args:
        model: a classifier mapping ``inputs`` to logits of shape ``(N, C)``.
        inputs: clean inputs of shape ``(N, ...)``, floating point, inside
            ``[clip_min, clip_max]``.
        targets: true class indices of shape ``(N,)``.
        eps: radius of the ball, in ``[0, diameter of the domain]``.
        steps: iterations per restart, ``>= 1`` (the paper uses 100).
        norm: ``"linf"`` or ``"l2"``.
        n_restarts: random restarts, ``>= 1``.
        rho: fraction of increasing steps below which the step size is halved
            (checkpoint condition 1), in ``(0, 1]``; the paper uses 0.75.
        momentum: weight ``alpha`` of the new step against the previous one, in
            ``(0, 1]``; the paper uses 0.75.
        seed: seed of the random start points.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.

    Returns:
        Detached adversarial inputs with the shape, dtype and device of ``inputs``.

    Raises:
        ValueError: a bad ``eps``, ``steps``, ``norm``, ``n_restarts``, ``rho``,
            ``momentum``, domain, shape or dtype, NaN inputs, or inputs outside the
            domain; the message names the argument.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec.attacks import apgd
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> x_adv = apgd(net, x, y, eps=0.1, steps=20, seed=0)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    norm = check_norm(norm)
    clip_min, clip_max = check_domain(clip_min, clip_max)
    check_batch(inputs, targets, clip_min, clip_max)
    eps = check_eps(eps, norm, inputs, clip_min, clip_max)
    steps = check_count(steps, "steps")
    n_restarts = check_count(n_restarts, "n_restarts")
    for name, value in (("rho", rho), ("momentum", momentum)):
        if check_step_size(value, name) > 1.0:
            raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    check_seed(seed)
    checkpoints = apgd_checkpoints(steps)
    with attack_mode(model):
        x = as_attack_tensor(inputs)
        y = as_attack_tensor(targets).long()
        result = x.clone()
        if x.shape[0] == 0:
            return result
        generator = torch.Generator(device=x.device).manual_seed(seed)
        with torch.no_grad():
            logits = check_logits(model(x), x.shape[0], y, "apgd")
            robust = logits.argmax(1) == y
        best_loss = torch.full(robust.shape, -math.inf, device=x.device)
        for _ in range(n_restarts):
            index = robust.nonzero().flatten()
            if index.numel() == 0:
                break
            x_best, fooled, loss_max = _apgd_run(
                model, x[index], y[index], eps, steps, norm, rho, momentum, checkpoints, generator, clip_min, clip_max
            )
            keep = fooled | (loss_max > best_loss[index])  # a misclassified point, or a higher loss
            result[index[keep]] = x_best[keep]
            best_loss[index] = torch.maximum(best_loss[index], loss_max.to(best_loss.dtype))
            robust[index[fooled]] = False
        return result.detach()


def _apgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    norm: Norm,
    rho: float,
    momentum: float,
    checkpoints: list[int],
    generator: torch.Generator,
    clip_min: float,
    clip_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD-CE run from a random start: ``(best points, misclassified mask, highest losses)``."""
    n = x.shape[0]
    view = (-1,) + (1,) * (x.ndim - 1)
    if norm == "linf":
        start = (2.0 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1.0) * eps
    else:  # a random point on the sphere of radius eps, as in the authors' code
        start = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = start / l2_norms(start).clamp_min(1e-12) * eps
    x_k = torch.clamp(x + start, clip_min, clip_max)

    def loss_and_grad(point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        point = point.detach().requires_grad_(True)
        logits = model(point)
        losses = F.cross_entropy(logits, y, reduction="none")
        grad = input_gradient(losses.sum(), point)
        return losses.detach(), grad, logits.detach().argmax(1) != y

    loss, grad, wrong = loss_and_grad(x_k)
    x_adv = x_k.clone()  # first misclassified iterate (meaningful where `fooled`)
    fooled = wrong.clone()
    x_max, loss_max, grad_max = x_k.clone(), loss.clone(), grad.clone()
    eta = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)
    history = torch.empty((steps + 1, n), device=x.device, dtype=loss.dtype)  # f(x^(k))
    history[0] = loss
    # state at the previous checkpoint, for condition 2
    loss_max_at_check = loss_max.clone()
    reduced_at_check = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_prev = x_k.clone()
    next_check = 1
    for k in range(steps):
        z = _project(x_k + eta.view(view) * _ascent_direction(grad, norm), x, eps, norm, clip_min, clip_max)
        if k == 0:
            x_next = z
        else:
            x_next = _project(
                x_k + momentum * (z - x_k) + (1.0 - momentum) * (x_k - x_prev), x, eps, norm, clip_min, clip_max
            )
        x_prev, x_k = x_k, x_next
        loss, grad, wrong = loss_and_grad(x_k)
        history[k + 1] = loss
        new_fooled = wrong & ~fooled
        x_adv[new_fooled] = x_k[new_fooled]
        fooled |= wrong
        better = loss > loss_max
        x_max[better], loss_max[better], grad_max[better] = x_k[better], loss[better], grad[better]
        iteration = k + 1
        if next_check < len(checkpoints) and iteration == checkpoints[next_check]:
            last = checkpoints[next_check - 1]
            increases = (history[last + 1 : iteration + 1] > history[last:iteration]).sum(0)
            oscillating = increases < rho * (iteration - last)
            stalled = ~reduced_at_check & (loss_max <= loss_max_at_check)
            reduce = oscillating | stalled
            eta = torch.where(reduce, eta / 2.0, eta)
            x_k = torch.where(reduce.view(view), x_max, x_k)
            grad = torch.where(reduce.view(view), grad_max, grad)
            reduced_at_check, loss_max_at_check = reduce, loss_max.clone()
            next_check += 1
    best = torch.where(fooled.view(view), x_adv, x_max)
    return best, fooled, loss_max
