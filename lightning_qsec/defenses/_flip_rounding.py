"""EFRAP: error-guided flipped rounding with activation preservation (private).

Li et al., "Nearest is Not Dearest: Towards Practical Defense against
Quantization-conditioned Backdoor Attacks", CVPR 2024, https://arxiv.org/abs/2405.12725
(code: https://github.com/AntigoneRandy/QuantBackdoor_EFRAP). Layer by layer, in forward
order, each weight's rounding (down, ``floor``, or up, ``floor + 1``) is relaxed to
``floor + h(v)`` with AdaRound's rectified sigmoid ``h`` (Nagel et al., ICML 2020,
https://arxiv.org/abs/2004.10568), initialised at the weight's fractional part, and
learned with three terms:

* activation preservation: the layer's output on the *repaired quantized* model's input
  must match the float model's output on clean data (relative squared error);
* error-guided flipping: a cross-entropy pulling ``h`` to the rounding *opposite* to
  nearest, weighted by the neuron-wise truncation-error norm (each output channel's
  ``||w / s - round(w / s)||``, normalised to mean 1 in the layer) times the weight's own
  truncation error, so the neurons a quantization-conditioned attack wrote into the
  rounding are flipped first;
* AdaRound's rounding regulariser ``1 - |2h - 1|^beta`` (beta annealed 20 -> 2), which
  drives ``h`` to 0 or 1.

Scales never change: the result is a valid deployment on the deployer's grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_qsec.defenses._repair_grid import LayerGrid, capture, minibatches

_ZETA, _GAMMA = 1.1, -0.1


def _soft(v: Tensor) -> Tensor:
    return ((_ZETA - _GAMMA) * torch.sigmoid(v) + _GAMMA).clamp(0.0, 1.0)


def _init(rest: Tensor) -> Tensor:
    """``v`` with ``h(v) = rest`` (the float weight's position between its two grid points)."""
    rest = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)


def flip_rounding(
    work: nn.Module,
    reference: nn.Module,
    grids: list[LayerGrid],
    inputs: list[Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    flip_weight: float,
    round_weight: float,
) -> None:
    """Learn every layer's rounding in place in ``work`` (weights become ``scale * integer``)."""
    for grid in grids:
        x_q = capture(work, [grid.name], inputs, outputs=False)[grid.name]
        y_f = capture(reference, [grid.name], inputs, outputs=True)[grid.name]
        ratio = grid.ratio
        floor = torch.floor(ratio)
        up = (grid.nearest - floor).clamp(0, 1)
        error = (ratio - grid.nearest).abs() * 2  # in [0, 1]
        neuron = error.flatten(1).norm(dim=1) if error.ndim > 1 else error.abs()
        neuron = neuron / neuron.mean().clamp_min(1e-12)
        guide = (neuron.view(-1, *([1] * (error.ndim - 1))) * error).masked_fill(grid.frozen, 0.0)
        free = (~grid.frozen).sum().clamp_min(1)
        v = _init(ratio - floor).requires_grad_()
        optimizer = torch.optim.Adam([v], lr=lr)
        bias = grid.layer.bias
        energy = y_f.pow(2).mean().clamp_min(1e-12)
        warmup = int(0.2 * steps)
        for step, idx in enumerate(minibatches(x_q.shape[0], batch_size, steps, x_q.device)):
            h = _soft(v)
            weight = grid.clamp(floor + h) * grid.scale
            params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias.detach()}
            out = functional_call(grid.layer, params, (x_q[idx],))
            loss = (out - y_f[idx]).pow(2).mean() / energy
            bce = F.binary_cross_entropy(h.clamp(1e-6, 1 - 1e-6), 1.0 - up, reduction="none")
            loss = loss + flip_weight * (guide * bce).sum() / free
            if step >= warmup:
                beta = 2 + 18 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
                loss = loss + round_weight * (1 - (2 * h - 1).abs().pow(beta)).masked_fill(grid.frozen, 0).sum() / free
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        grid.store(floor + (v.detach() >= 0).to(floor.dtype))
