"""Plain quantization-aware fine-tuning on clean data: the repair baseline (private).

The deployer's exact weight arithmetic (max-abs scale recomputed every step,
round-to-nearest, straight-through estimator) in the forward pass, cross-entropy on the
labelled calibration batches, Adam on all parameters (frozen ones included). The result is the latent
float model; the deployer's quantizer rounds it to what was trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_qsec.quant.weight_grid import fake_quantize
from lightning_qsec.defenses._repair_grid import LayerGrid, minibatches


def qat_finetune(
    work: nn.Module,
    grids: list[LayerGrid],
    inputs: list[Tensor],
    targets: list[Tensor],
    *,
    bit_width: int,
    per_channel: bool,
    steps: int,
    lr: float,
    batch_size: int,
) -> None:
    """Fine-tune every parameter of ``work`` in place through fake-quantized weights.

    Parameters frozen for inference are trained too (their ``requires_grad`` is set);
    the caller restores the flags afterwards.
    """
    x, y = torch.cat(inputs), torch.cat(targets)
    weights = {f"{g.name}.weight": g.layer.weight for g in grids}
    trainable = list(work.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    for idx in minibatches(x.shape[0], batch_size, steps, x.device):
        params: dict[str, Tensor] = {n: fake_quantize(w, bit_width, per_channel) for n, w in weights.items()}
        loss = F.cross_entropy(functional_call(work, params, (x[idx],)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in trainable:
        p.grad = None
