"""LAC-style layer-wise activation alignment on the deployer's grid (private).

After Li et al., "Purifying Quantization-conditioned Backdoors via Layer-wise Activation
Correction with Distribution Approximation", ICML 2024,
https://proceedings.mlr.press/v235/li24e.html: the quantized model's activations are
aligned, layer by layer, with the float model's on clean data. Here every layer's
integer weights (straight-through estimator, scales fixed, scale-setting weights frozen)
and float biases are trained jointly on the sum over layers of the relative squared
error between the quantized and the float layer outputs, starting from the deployer's
nearest rounding. LAC's distribution-approximation module, which reads BatchNorm
statistics, is not included (the package's CNNs have no BatchNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_qsec.defenses._repair_grid import LayerGrid, capture, minibatches


def activation_alignment(
    work: nn.Module,
    reference: nn.Module,
    grids: list[LayerGrid],
    inputs: list[Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
) -> None:
    """Align ``work``'s quantized activations with ``reference``'s, in place."""
    names = [g.name for g in grids]
    x = torch.cat(inputs)
    targets = capture(reference, names, inputs, outputs=True)
    energy = {n: t.pow(2).mean().clamp_min(1e-12) for n, t in targets.items()}
    latent = [g.ratio.clone().requires_grad_() for g in grids]
    biases = [g.layer.bias for g in grids if g.layer.bias is not None]
    optimizer = torch.optim.Adam([{"params": latent, "lr": lr}, {"params": biases, "lr": lr * 0.1}])
    outputs: dict[str, Tensor] = {}
    hooks = [
        work.get_submodule(n).register_forward_hook(lambda _m, _a, out, key=n: outputs.__setitem__(key, out))
        for n in names
    ]
    flags = {p: p.requires_grad for p in work.parameters()}
    try:
        for p in work.parameters():
            p.requires_grad_(False)
        for b in biases:
            b.requires_grad_(True)
        for idx in minibatches(x.shape[0], batch_size, steps, x.device):
            params = {}
            for g, u in zip(grids, latent):
                q = u + (torch.round(u) - u).detach()
                params[f"{g.name}.weight"] = g.clamp(q) * g.scale
            functional_call(work, params, (x[idx],))
            loss = sum(((outputs[n] - targets[n][idx]).pow(2).mean() / energy[n]) for n in names)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for b in biases:
            b.grad = None
    for g, u in zip(grids, latent):
        g.store(torch.round(u.detach()))
