"""The context every attack runs in, and the gradient/projection helpers the attacks share.

:func:`attack_mode` is the single place that decides how a model is run while an
attack crafts inputs:

* every submodule is put in eval mode, so BatchNorm running statistics and Brevitas
  activation statistics (gathered in train mode during the first
  ``collect_stats_steps`` forward passes) are read, never updated;
* every parameter has ``requires_grad`` switched off, so gradients flow to the input
  only: no parameter ``.grad`` is written and no weight gradient is computed;
* gradients are enabled even inside ``torch.inference_mode()`` or ``torch.no_grad()``
  (as in Lightning's validation and test loops);
* on exit, each submodule's own train/eval flag and each parameter's
  ``requires_grad`` are restored exactly, also when the attack raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "Norm",
    "as_attack_tensor",
    "attack_mode",
    "check_logits",
    "input_gradient",
    "l2_norms",
    "project_l2",
    "random_start",
]

Norm = Literal["linf", "l2"]
_TINY = 1e-12


@contextmanager
def attack_mode(*models: nn.Module) -> Iterator[None]:
    """Run ``models`` for an attack: eval mode, frozen parameters, gradients on.

    Models may share submodules or be the same object; each module and parameter is
    saved and restored once.

    Args:
        *models: the modules the attack will call.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)).train()
        >>> with torch.inference_mode(), attack_mode(net):
        ...     x = torch.zeros(3, 4, requires_grad=True)
        ...     g, = torch.autograd.grad(net(x).sum(), x)
        >>> net.training, net[0].weight.requires_grad, net[0].weight.grad is None
        (True, True, True)
    """
    modules: dict[nn.Module, bool] = {}
    params: dict[nn.Parameter, bool] = {}
    for model in models:
        if not isinstance(model, nn.Module):
            raise TypeError(f"an attack needs torch.nn.Module models, got {type(model).__name__}")
        for module in model.modules():
            modules.setdefault(module, module.training)
        for param in model.parameters():
            params.setdefault(param, param.requires_grad)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for model in models:
                model.eval()
            for param in params:
                param.requires_grad_(False)
            yield
    finally:
        # Attribute by attribute, not module.train(flag): that recurses into children and,
        # with nested or shared models, would overwrite flags already restored.
        for module, training in modules.items():
            module.training = training
        for param, requires_grad in params.items():
            param.requires_grad_(requires_grad)


def as_attack_tensor(tensor: Tensor) -> Tensor:
    """A detached tensor usable with autograd; inference tensors are cloned.

    Call it inside :func:`attack_mode` (outside inference mode).
    """
    tensor = tensor.detach()
    return tensor.clone() if tensor.is_inference() else tensor


def input_gradient(loss: Tensor, inputs: Tensor) -> Tensor:
    """Gradient of a scalar ``loss`` with respect to ``inputs`` only (no parameter ``.grad``).

    A loss that does not depend on ``inputs`` (a model that detaches its input) gives a
    zero gradient and a warning: such a model masks gradients, and a gradient attack
    cannot move it.
    """
    if not loss.requires_grad:
        warnings.warn(
            "the model's output does not depend differentiably on its inputs (is the input "
            "detached or rounded without a straight-through estimator?); the attack gets a zero "
            "gradient. This is gradient masking: check robustness with a transfer or black-box attack.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(loss, inputs, allow_unused=True)
    return torch.zeros_like(inputs) if grad is None else grad


def l2_norms(x: Tensor) -> Tensor:
    """Per-sample L2 norms of ``x`` (shape ``(N, ...)``), shaped ``(N, 1, ..., 1)`` to broadcast."""
    return x.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.ndim - 1)))


def project_l2(delta: Tensor, eps: float | Tensor) -> Tensor:
    """Scale each sample of ``delta`` into the L2 ball of radius ``eps``."""
    norms = l2_norms(delta)
    factor = torch.clamp(eps / norms.clamp_min(_TINY), max=1.0)
    return delta * factor


def random_start(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> Tensor:
    """A random perturbation in the ``norm`` ball of radius ``eps`` (not yet clamped to the domain).

    ``linf``: uniform in ``[-eps, eps]`` per coordinate. ``l2``: a uniformly random
    direction with a radius drawn uniformly from ``[0, eps]``.
    """
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2.0 * u - 1.0) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / l2_norms(direction).clamp_min(_TINY)
    radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
    return direction * radius.view(-1, *([1] * (x.ndim - 1))) * eps


def check_logits(logits: object, num_samples: int, targets: Tensor, caller: str) -> Tensor:
    """Check a model's output once: a ``(N, C)`` tensor, with every target in ``[0, C)``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != num_samples:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"{caller} needs a model returning logits of shape (N, C) = ({num_samples}, C), got {shape}"
        )
    num_classes = logits.shape[1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}) for a model with {num_classes} "
            f"outputs, got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    return logits

