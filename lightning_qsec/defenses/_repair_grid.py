"""The deployer's weight grid, shared by the repair methods (private).

Every repair method chooses, for each conv/linear weight, an integer on the grid the
deployer's quantizer will use (signed, narrow range, max-abs scale per tensor or per
output channel, the arithmetic of Brevitas ``Int8WeightPerTensorFloat`` /
``Int8WeightPerChannelFloat`` that :func:`~lightning_qsec.attacks.victim_quantize`
applies). The repaired float model stores ``scale * integer`` for every weight. The
weights that set a scale (the max-abs weight of the tensor, or of each output channel)
keep their integer ``+-qmax``, so the deployer's quantizer recomputes the same scales and
rounds every stored weight back to the chosen integer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_qsec.quant.weight_grid import integer_grid, max_abs, weight_layers
from lightning_qsec.batch import BatchAdapter, adapter_or_default


@dataclass
class LayerGrid:
    """One conv/linear layer of the model being repaired and its fixed grid.

    Attributes:
        name: module name.
        layer: the module (in the working copy).
        weight: the published float weight (a detached copy).
        scale: the deployer's scale, broadcastable to ``weight``.
        qmax: ``2 ** (bits - 1) - 1``.
        nearest: round-to-nearest integers (what the deployer gets without repair).
        frozen: the scale-setting weights, whose integer must stay ``+-qmax``.
    """

    name: str
    layer: nn.Module
    weight: Tensor
    scale: Tensor
    qmax: int
    nearest: Tensor
    frozen: Tensor

    @property
    def ratio(self) -> Tensor:
        """``weight / scale``: the weight in grid steps."""
        return self.weight / self.scale

    def clamp(self, integers: Tensor) -> Tensor:
        """Integers kept in ``[-qmax, qmax]`` with the scale-setting ones unchanged."""
        return torch.where(self.frozen, self.nearest, integers.clamp(-self.qmax, self.qmax))

    def store(self, integers: Tensor) -> None:
        """Write ``scale * integers`` into the layer's weight."""
        with torch.no_grad():
            self.layer.weight.copy_(self.clamp(integers) * self.scale)


def layer_grids(model: nn.Module, bit_width: int, per_channel: bool) -> list[LayerGrid]:
    """The grid of every layer :func:`~lightning_qsec.quantize_model` swaps, in definition order."""
    grids = []
    for name, layer in weight_layers(model):
        weight = layer.weight.detach().clone()
        scale, nearest, qmax = integer_grid(weight, bit_width, per_channel)
        frozen = weight.abs() >= max_abs(weight, per_channel)
        grids.append(LayerGrid(name, layer, weight, scale, qmax, nearest, frozen))
    return grids


@dataclass(frozen=True)
class Calibration:
    """Clean calibration batches held in memory: inputs, and targets when the loader has labels."""

    inputs: list[Tensor]
    targets: list[Tensor] | None

    def labelled(self) -> list[tuple[Tensor, Tensor]]:
        """``(x, y)`` pairs; batches without labels get dummy zeros (for activation calibration only)."""
        if self.targets is None:
            return [(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)) for x in self.inputs]
        return list(zip(self.inputs, self.targets))


def read_calibration(
    loader: Iterable[Any], num_batches: int, device: torch.device, batch_adapter: BatchAdapter | None, argument: str
) -> Calibration:
    """Take up to ``num_batches`` batches; a bare tensor batch is read as inputs without labels."""
    read = adapter_or_default(batch_adapter)
    inputs: list[Tensor] = []
    targets: list[Tensor] = []
    unlabelled = False
    with torch.inference_mode(False):
        for batch in loader:
            if len(inputs) >= num_batches:
                break
            if isinstance(batch, Tensor) and batch_adapter is None:
                inputs.append(batch.clone().to(device))
                unlabelled = True
                continue
            if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
                inputs.append(batch[0].clone().to(device))
                unlabelled = True
                continue
            b = read(batch)
            inputs.append(b.inputs.clone().to(device))
            targets.append(b.targets.clone().to(device))
    if not inputs:
        raise ValueError(f"{argument} is empty: the repair needs at least one batch of clean data")
    if any(x.is_floating_point() and torch.isnan(x).any() for x in inputs):
        raise ValueError(f"{argument} has NaN inputs")
    return Calibration(inputs, None if unlabelled else targets)


def capture(model: nn.Module, names: list[str], inputs: list[Tensor], *, outputs: bool) -> dict[str, Tensor]:
    """Inputs (or outputs) of the named modules over all batches, concatenated; no grad."""
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = []
    for name in names:
        def hook(_: nn.Module, args: tuple[Tensor, ...], out: Tensor, key: str = name) -> None:
            store[key].append((out if outputs else args[0]).detach())

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def minibatches(n: int, size: int, steps: int, device: torch.device) -> Iterator[Tensor]:
    """``steps`` random index batches over ``range(n)`` (torch's global RNG)."""
    for _ in range(steps):
        yield torch.randint(0, n, (min(size, n),), device=device)
