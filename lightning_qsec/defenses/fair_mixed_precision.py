"""FairQuanti-style neuron-level mixed-precision post-training quantization.

FairQuanti (Cao et al., "FairQuanti: Enhancing Fairness in Deep Neural Network
Quantization via Neuron Role Contribution", https://www.deepdyve.com/lp/doc/H4eC0CkODF)
flips the sensitive attribute of each input, scores every neuron by its contribution
to the resulting change of the output (its *bias*), and quantizes the biased neurons
at another precision than the normal ones. Here the most biased neurons keep a high
weight bit width and all the others get a low one.

Design. A neuron is an output unit of a ``nn.Linear`` (a row of its weight) or an
output channel of a ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1``. Brevitas keeps one
bit width per weight quantizer, so a layer whose rows need two bit widths is split
into two Brevitas layers (:class:`NeuronPrecisionSplit`): one holding the low-precision
rows, one the high-precision rows, both fed the same input, their outputs put back in
the original neuron order. Nothing is simulated outside Brevitas: every weight is
quantized by a Brevitas quantizer whose ``stateful_const`` bit width is a buffer, so
:func:`~lightning_qsec.quant.bit_widths` lists both parts, and
:func:`~lightning_qsec.quant.at_precision`, :func:`~lightning_qsec.quant.float_mode`,
:func:`~lightning_qsec.quant.calibrate`, ``PrecisionSweep`` and ``FairnessEvaluation``
work on the result (``at_precision`` overrides both parts uniformly), and it exports
to QCDQ ONNX with :func:`~lightning_qsec.export_onnx`. With
``per_channel=True`` (the default here) every row has its own scale, so the split
changes only the bit widths, never a row's grid; with per-tensor scales each part gets
the scale of its own rows. The first layer's two parts each quantize the model input
with identical settings (same statistics, same scale). A split model's checkpoint is
reloaded by rebuilding it with :func:`quantize_neurons` from the float model and the
recorded selection, then ``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec._validation import check_bit_width, check_positive_int
from lightning_qsec.attacks._context import attack_mode
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.convert import WEIGHT_LAYERS, _set_submodule, _weight_layer, quantize_model
from lightning_qsec.quant.precision import require_float

__all__ = [
    "FairMixedPrecisionResult",
    "NeuronPrecisionSplit",
    "fair_mixed_precision",
    "neuron_bias_scores",
    "quantize_neurons",
]

FlipFn = Callable[[Tensor], Tensor]


class NeuronPrecisionSplit(nn.Module):
    """One weight layer computed by two Brevitas layers: low- and high-precision neurons.

    Args:
        low: the Brevitas layer holding the low-precision rows (output units/channels).
        high: the Brevitas layer holding the high-precision rows.
        high_rows: indices, in the original layer, of the rows that ``high`` holds.
        dim: the output dimension that indexes neurons (-1 for linear, 1 for conv).
    """

    def __init__(self, low: nn.Module, high: nn.Module, high_rows: Tensor, dim: int) -> None:
        super().__init__()
        self.low = low
        self.high = high
        self.dim = dim
        n = int(_out_units(low)) + int(_out_units(high))
        is_high = torch.zeros(n, dtype=torch.bool)
        is_high[high_rows] = True
        order = torch.cat([(~is_high).nonzero().flatten(), is_high.nonzero().flatten()])
        self.register_buffer("inverse", torch.argsort(order))  # position of row i in cat(low, high)

    @property
    def high_rows(self) -> list[int]:
        """The high-precision rows, in the original layer's numbering."""
        n_low = int(_out_units(self.low))
        return sorted(int(i) for i in (self.inverse >= n_low).nonzero().flatten())

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([self.low(x), self.high(x)], dim=self.dim)
        return out.index_select(self.dim, self.inverse)


@dataclass(frozen=True)
class FairMixedPrecisionResult:
    """What :func:`fair_mixed_precision` scored and chose.

    Attributes:
        scores: layer name -> per-neuron bias score, shape ``(out_units,)``: the mean
            over inputs of ``|contribution to the change in output when the sensitive
            attribute is flipped|``.
        high_precision_neurons: layer name -> sorted indices of the neurons quantized at
            ``high_bit_width`` (every layer is listed, possibly with no neuron).
        low_bit_width: weight bit width of every other neuron.
        high_bit_width: weight bit width of the selected neurons.
        act_bit_width: bit width of activations and of the model input.
        high_precision_fraction: the fraction of neurons given the high bit width.
        average_bit_width: mean weight bit width over the weights of the scored
            layers (biases are not quantized): the memory budget actually spent.
        num_samples: inputs the scores were averaged over.
        prediction_flip_rate: fraction of those inputs whose float prediction changes
            when the sensitive attribute is flipped.
    """

    scores: dict[str, Tensor]
    high_precision_neurons: dict[str, list[int]]
    low_bit_width: int
    high_bit_width: int
    act_bit_width: int
    high_precision_fraction: float
    average_bit_width: float
    num_samples: int
    prediction_flip_rate: float

    def neuron_bit_widths(self) -> dict[str, Tensor]:
        """Layer name -> weight bit width of each neuron, shape ``(out_units,)``."""
        out = {}
        for name, score in self.scores.items():
            bits = torch.full(score.shape, self.low_bit_width, dtype=torch.long)
            bits[self.high_precision_neurons[name]] = self.high_bit_width
            out[name] = bits
        return out


# -- neurons ------------------------------------------------------------------------------------


def _out_units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def _neuron_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The float layers whose output units can be split: linear and ungrouped conv layers."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and type(m) in WEIGHT_LAYERS and getattr(m, "groups", 1) == 1
    }


def _index_flip(indices: Sequence[int]) -> FlipFn:
    """Flip a 0/1 column (one index) or roll the values of a one-hot block (several)."""
    idx = list(indices)

    def flip(x: Tensor) -> Tensor:
        out = x.clone()
        if len(idx) == 1:
            column = x[:, idx[0]]
            if not bool(((column == 0) | (column == 1)).all()):
                raise ValueError(
                    f"sensitive_attribute_index={idx[0]} names a column with values other than 0 and 1; "
                    "pass the indices of the attribute's one-hot columns (a list) or a flip_fn"
                )
            out[:, idx[0]] = 1 - column
        else:  # column idx[k] takes the value of column idx[k - 1]: a swap for two columns
            out[:, idx] = x[:, idx[-1:] + idx[:-1]]
        return out

    return flip


def _check_flip_arguments(
    sensitive_attribute_index: int | Sequence[int] | None, flip_fn: FlipFn | None
) -> tuple[FlipFn, list[int]]:
    """The flip to apply and the sensitive columns (empty for a ``flip_fn``)."""
    if (sensitive_attribute_index is None) == (flip_fn is None):
        raise ValueError(
            "pass exactly one of sensitive_attribute_index (an input column index, or the indices of a "
            "one-hot block) and flip_fn (a callable returning the inputs with the sensitive attribute flipped)"
        )
    if flip_fn is not None:
        if not callable(flip_fn):
            raise ValueError(f"flip_fn must be a callable Tensor -> Tensor, got {type(flip_fn).__name__}")
        return flip_fn, []
    raw = [sensitive_attribute_index] if isinstance(sensitive_attribute_index, int) else sensitive_attribute_index
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw:
        raise ValueError(
            "sensitive_attribute_index must be a non-negative int or a non-empty sequence of them, "
            f"got {sensitive_attribute_index!r}"
        )
    indices = list(raw)
    bad = any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices)
    if bad or len(set(indices)) != len(indices):
        raise ValueError(
            f"sensitive_attribute_index must hold distinct non-negative ints, got {sensitive_attribute_index!r}"
        )
    return _index_flip(indices), indices


def neuron_bias_scores(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    sensitive_attribute_index: int | Sequence[int] | None = None,
    flip_fn: FlipFn | None = None,
    num_batches: int = 20,
    batch_adapter: BatchAdapter | None = None,
) -> tuple[dict[str, Tensor], int, float]:
    """Score every neuron of a float model by its contribution to the flip's change in output.

    For an input ``x`` and its flipped twin ``x'`` (sensitive attribute flipped), let
    ``s`` be the log-probability of the class the model predicts for ``x`` (the logit
    for a single-output model) and ``a_j`` neuron ``j``'s output (a linear layer's unit
    or a conv layer's channel, before the activation). Neuron ``j``'s contribution to
    ``s(x) - s(x')`` is estimated to first order with the trapezoid rule, as in the
    Taylor criterion of Molchanov et al. (ICLR 2017, https://arxiv.org/abs/1611.06440)::

        c_j = sum over positions of (a_j(x) - a_j(x')) * (ds/da_j(x) + ds/da_j(x')) / 2

    and its score is the mean of ``|c_j|`` over the inputs. A neuron whose output does
    not move when the attribute flips (e.g. a first-layer unit with zero weight on the
    sensitive columns) scores exactly 0. The contributions are in the units of ``s``,
    so scores of different layers are comparable.

    Args:
        model: the float model (eval mode is used; flags and ``requires_grad`` are restored).
        dataloader: batches read by the batch adapter.
        sensitive_attribute_index: column of ``x[:, i]`` holding a 0/1 attribute (flipped
            to ``1 - x``), or the columns of its one-hot block (values rolled by one
            column: a swap for two columns). Exactly one of this and ``flip_fn``.
        flip_fn: a callable returning a batch of inputs with the attribute flipped.
        num_batches: batches to average over (>= 1); fewer if the loader ends first.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.

    Returns:
        ``(scores, num_samples, prediction_flip_rate)``: layer name -> scores ``(out_units,)``.

    Raises:
        ValueError: naming the argument: neither or both flip arguments, an index out of
            range, a flip that changes no input or changes the shape, an empty loader,
            a quantized model or one without linear/conv layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.cat([torch.randn(8, 2), torch.randint(0, 2, (8, 1)).float()], 1)
        >>> scores, n, rate = neuron_bias_scores(net, [(x, torch.zeros(8, dtype=torch.long))],
        ...                                      sensitive_attribute_index=2)
        >>> sorted(scores), scores["0"].shape, n
        (['0', '2'], torch.Size([4]), 8)
    """
    flip, columns = _check_flip_arguments(sensitive_attribute_index, flip_fn)
    check_positive_int(num_batches, "num_batches")
    require_float(model, "neuron bias scores are computed on the float model")
    layers = _candidate_layers(model)
    if not layers:
        raise ValueError(
            f"model has no nn.Linear/nn.Conv1d/nn.Conv2d (groups=1) layer to score: {type(model).__name__}"
        )
    read = adapter_or_default(batch_adapter)
    device = next(model.parameters()).device
    outputs: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def store(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            outputs[name] = output

        return store

    def activations_and_grads(x: Tensor, cls: Tensor | None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """The predicted classes, the neuron outputs and ds/d(outputs), s scored for class ``cls``."""
        outputs.clear()
        flat = model(x).reshape(len(x), -1)
        if flat.shape[1] == 1:
            pred, s = (flat[:, 0] > 0).long(), flat[:, 0]
        else:
            pred = flat.argmax(1)
            s = F.log_softmax(flat, dim=1).gather(1, (pred if cls is None else cls)[:, None])[:, 0]
        called = [n for n in layers if n in outputs]  # a layer forward() never calls scores 0
        acts = [outputs[n] for n in called]
        grads = torch.autograd.grad(s.sum(), acts, allow_unused=True)
        return (
            pred.detach(),
            {n: a.detach() for n, a in zip(called, acts)},
            {n: torch.zeros_like(a) if g is None else g for n, a, g in zip(called, acts, grads)},
        )

    scores = {name: torch.zeros(_out_units(m), dtype=torch.float64) for name, m in layers.items()}
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    seen = samples = flipped_preds = 0
    changed_any = False
    try:
        with attack_mode(model):
            for batch in dataloader:
                x = read(batch).inputs.to(device).detach().clone()
                bad = [i for i in columns if i >= x.shape[1]]
                if bad:
                    raise ValueError(
                        f"sensitive_attribute_index {bad} out of range: inputs have {x.shape[1]} "
                        f"columns (allowed 0..{x.shape[1] - 1})"
                    )
                x_flip = flip(x)
                if not isinstance(x_flip, Tensor) or x_flip.shape != x.shape:
                    raise ValueError(
                        f"flip_fn must return a tensor shaped like its input {tuple(x.shape)}, got "
                        f"{tuple(x_flip.shape) if isinstance(x_flip, Tensor) else type(x_flip).__name__}"
                    )
                x_flip = x_flip.to(device=device, dtype=x.dtype).detach().clone()
                changed_any = changed_any or bool((x_flip != x).any())
                x.requires_grad_(True)
                x_flip.requires_grad_(True)
                pred, acts, grads = activations_and_grads(x, None)
                pred_flip, acts_flip, grads_flip = activations_and_grads(x_flip, pred)
                flipped_preds += int((pred_flip != pred).sum())
                for name, layer in layers.items():
                    if name not in acts or name not in acts_flip:
                        continue
                    c = (acts[name] - acts_flip[name]) * (grads[name] + grads_flip[name]) / 2
                    c = c.movedim(_neuron_dim(layer), 1).reshape(len(x), c.shape[_neuron_dim(layer)], -1).sum(2)
                    scores[name] += c.abs().sum(0).double().cpu()
                samples += len(x)
                seen += 1
                if seen >= num_batches:
                    break
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("dataloader is empty: neuron bias scores need at least one batch")
    if not changed_any:
        raise ValueError(
            "the flip changed no input: check sensitive_attribute_index/flip_fn (is the sensitive "
            "column among the features? AdultDataModule drops it unless include_sensitive_feature=True)"
        )
    return {n: (s / samples).float() for n, s in scores.items()}, samples, flipped_preds / samples


# -- quantization -------------------------------------------------------------------------------


def _sub_layer(layer: nn.Module, rows: Tensor) -> nn.Module:
    """A float copy of ``layer`` holding only the output ``rows``."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        sub: nn.Module = nn.Linear(layer.in_features, len(rows), bias=bias)
    else:
        sub = type(layer)(
            layer.in_channels, len(rows), layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, bias=bias, padding_mode=layer.padding_mode,
        )  # fmt: skip
    sub = sub.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        sub.weight.copy_(layer.weight[rows])
        if bias:
            sub.bias.copy_(layer.bias[rows])
    for name, param in layer.named_parameters(recurse=False):  # a frozen layer stays frozen
        sub.get_parameter(name).requires_grad_(param.requires_grad)
    return sub


def _check_selection(
    high_precision_neurons: Mapping[str, Sequence[int]], layers: Mapping[str, nn.Module]
) -> dict[str, list[int]]:
    if not isinstance(high_precision_neurons, Mapping):
        raise ValueError(
            "high_precision_neurons must be a mapping layer name -> sequence of output indices, got "
            f"{type(high_precision_neurons).__name__}; allowed layers: {list(layers)}"
        )
    out = {}
    for name, rows in high_precision_neurons.items():
        if isinstance(rows, Tensor):
            rows = rows.tolist()
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not all(
            isinstance(r, (int, np.integer)) and not isinstance(r, (bool, np.bool_)) for r in rows
        ):
            raise ValueError(f"high_precision_neurons[{name!r}] must be a sequence of integer indices, got {rows!r}")
        if name not in layers:
            raise ValueError(
                f"high_precision_neurons names {name!r}, which is not a linear/conv layer of the model; "
                f"allowed: {list(layers)}"
            )
        rows = sorted(int(r) for r in rows)
        n = _out_units(layers[name])
        if len(set(rows)) != len(rows) or any(not 0 <= r < n for r in rows):
            raise ValueError(f"high_precision_neurons[{name!r}] must hold distinct indices in 0..{n - 1}, got {rows}")
        out[name] = rows
    return out


def quantize_neurons(
    model: nn.Module,
    high_precision_neurons: Mapping[str, Sequence[int]],
    *,
    low_bit_width: int = 4,
    high_bit_width: int = 8,
    act_bit_width: int = 8,
    per_channel: bool = True,
    quantize_input: bool = True,
) -> nn.Module:
    """Quantize a float model in place, chosen neurons at a high weight bit width, the rest low.

    The model is first quantized by :func:`~lightning_qsec.quantize_model` at
    ``low_bit_width`` weights and ``act_bit_width`` activations; then each layer with
    chosen neurons is rebuilt from its float weights: as one Brevitas layer at
    ``high_bit_width`` if all its neurons are chosen, else as a
    :class:`NeuronPrecisionSplit`. Activation scales still need
    :func:`~lightning_qsec.calibrate`.

    Args:
        model: the float model; changed in place and returned.
        high_precision_neurons: layer name -> indices of its output units/channels to
            keep at ``high_bit_width``; layers not named stay at ``low_bit_width``.
        low_bit_width: weight bit width of the other neurons, 2..16.
        high_bit_width: weight bit width of the chosen neurons, 2..16.
        act_bit_width: activation and input bit width, 2..16.
        per_channel: per-output-channel weight scales.
        quantize_input: quantize the model input (first linear/conv layer).

    Returns:
        ``model``.

    Raises:
        ValueError: a quantized model, a bit width outside 2..16, or a selection naming an
            unknown layer or an index out of range.

    Example:
        >>> from torch import nn
        >>> from lightning_qsec.quant import bit_widths
        >>> net = quantize_neurons(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
        ...                        {"0": [1]}, low_bit_width=3, high_bit_width=8)
        >>> sorted(bit_widths(net)["weight"].values())
        [3, 3, 8]
    """
    low = check_bit_width(low_bit_width, "low_bit_width")
    high = check_bit_width(high_bit_width, "high_bit_width")
    check_bit_width(act_bit_width, "act_bit_width")
    require_float(model, "quantize_neurons needs the float model")
    layers = _candidate_layers(model)
    selection = {n: r for n, r in _check_selection(high_precision_neurons, layers).items() if r}
    quantize_model(model, weight_bit_width=low, act_bit_width=act_bit_width, quantize_input=quantize_input,
                   per_channel=per_channel)  # fmt: skip
    for name, rows in selection.items():
        float_layer = layers[name]
        quant_layer = model.get_submodule(name)
        input_bits = act_bit_width if quant_layer.input_quant.is_quant_enabled else None
        n = _out_units(float_layer)
        high_rows = torch.tensor(rows, dtype=torch.long)
        if len(rows) == n:
            new: nn.Module = _weight_layer(float_layer, high, input_bits, per_channel)
        else:
            low_rows = torch.tensor(sorted(set(range(n)) - set(rows)), dtype=torch.long)
            new = NeuronPrecisionSplit(
                _weight_layer(_sub_layer(float_layer, low_rows), low, input_bits, per_channel),
                _weight_layer(_sub_layer(float_layer, high_rows), high, input_bits, per_channel),
                high_rows,
                _neuron_dim(float_layer),
            )
        new.train(float_layer.training)
        _set_submodule(model, name, new.to(float_layer.weight.device))
    return model


def _average_bit_width(
    layers: Mapping[str, nn.Module], selection: Mapping[str, list[int]], low: int, high: int
) -> float:
    bits = weights = 0
    for name, layer in layers.items():
        per_row = layer.weight[0].numel()
        n_high = len(selection.get(name, []))
        bits += per_row * (n_high * high + (_out_units(layer) - n_high) * low)
        weights += per_row * _out_units(layer)
    return bits / weights


def fair_mixed_precision(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    sensitive_attribute_index: int | Sequence[int] | None = None,
    flip_fn: FlipFn | None = None,
    high_precision_fraction: float = 0.1,
    low_bit_width: int = 4,
    high_bit_width: int = 8,
    act_bit_width: int = 8,
    per_channel: bool = True,
    score_batches: int = 20,
    calibrate_batches: int = 10,
    batch_adapter: BatchAdapter | None = None,
) -> tuple[nn.Module, FairMixedPrecisionResult]:
    """FairQuanti-style PTQ: the neurons that carry the sensitive attribute's effect keep more bits.

    1. Score every neuron of the float model with :func:`neuron_bias_scores` (flip the
       sensitive attribute of each input, attribute the change in output to neurons).
    2. Choose the ``floor(high_precision_fraction * N)`` highest-scored of the model's
       ``N`` neurons, over all linear/conv layers together (ties: earlier layer and
       neuron first).
    3. Quantize them at ``high_bit_width`` and every other neuron at ``low_bit_width``
       (:func:`quantize_neurons`; see the module docstring for the layer split), and
       calibrate activation scales on ``calibrate_batches`` batches of ``dataloader``.

    FairQuanti (Cao et al., https://www.deepdyve.com/lp/doc/H4eC0CkODF) tunes each
    role's precision with Bayesian optimisation; here the two bit widths and the budget
    are given, so the result can be compared with uniform and random allocations at the
    same cost (``benchmarks/fair_mixed_precision.py``).

    Args:
        model: a trained float model; quantized in place and returned.
        dataloader: batches read by the batch adapter, for scoring and calibration
            (e.g. the training loader); it is read twice, so it must be re-iterable (a
            ``DataLoader`` or a list, not a generator).
        sensitive_attribute_index: column ``x[:, i]`` holding a 0/1 attribute, or the
            columns of its one-hot block (rolled by one column; a swap for two). On
            Adult with ``include_sensitive_feature=True``:
            ``[dm.feature_names.index("sex=Female"), dm.feature_names.index("sex=Male")]``.
            Exactly one of this and ``flip_fn``.
        flip_fn: callable returning a batch of inputs with the sensitive attribute flipped.
        high_precision_fraction: fraction of neurons kept at ``high_bit_width``, in (0, 1).
        low_bit_width: weight bit width of the other neurons, 2..16, below ``high_bit_width``.
        high_bit_width: weight bit width of the most biased neurons, 2..16.
        act_bit_width: activation and input bit width, 2..16.
        per_channel: per-output-channel weight scales (each neuron its own grid).
        score_batches: batches used for the scores (>= 1).
        calibrate_batches: batches used to calibrate activation scales (>= 1).
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.

    Returns:
        ``(model, result)``: the quantized, calibrated model (eval/train flags kept) and a
        :class:`FairMixedPrecisionResult`.

    Raises:
        ValueError: naming the argument: neither or both of ``sensitive_attribute_index``
            and ``flip_fn``, an index out of range, a fraction outside (0, 1) or too small
            to choose one neuron, bit widths outside 2..16 or ``low >= high``, a model
            already quantized, an empty ``dataloader``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.cat([torch.randn(32, 2), torch.randint(0, 2, (32, 1)).float()], 1)
        >>> data = [(x, torch.zeros(32, dtype=torch.long))]
        >>> qnet, res = fair_mixed_precision(net, data, sensitive_attribute_index=2,
        ...                                  high_precision_fraction=0.2, low_bit_width=3)
        >>> sum(len(r) for r in res.high_precision_neurons.values())
        2
        >>> y = qnet(x)
    """
    if iter(dataloader) is dataloader:
        raise ValueError(
            "dataloader must be re-iterable (a DataLoader or a list): it is read for scoring and again for "
            f"calibration, got a one-shot iterator ({type(dataloader).__name__})"
        )
    fraction = high_precision_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"high_precision_fraction must be a number in (0, 1), got {fraction!r}")
    low = check_bit_width(low_bit_width, "low_bit_width")
    high = check_bit_width(high_bit_width, "high_bit_width")
    act = check_bit_width(act_bit_width, "act_bit_width")
    if low >= high:
        raise ValueError(f"low_bit_width ({low}) must be below high_bit_width ({high})")
    check_positive_int(calibrate_batches, "calibrate_batches")
    require_float(model, "fair_mixed_precision is post-training quantization of a float model")
    scores, samples, flip_rate = neuron_bias_scores(
        model, dataloader, sensitive_attribute_index=sensitive_attribute_index, flip_fn=flip_fn,
        num_batches=score_batches, batch_adapter=batch_adapter,
    )  # fmt: skip
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    k = math.floor(fraction * len(flat))
    if k == 0:
        raise ValueError(
            f"high_precision_fraction={fraction} chooses no neuron out of {len(flat)}; "
            f"use at least {1 / len(flat):.4g}"
        )
    chosen = torch.sort(flat, descending=True, stable=True).indices[:k]
    owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
    offset = dict(zip(names, torch.cumsum(torch.tensor([0] + [len(scores[n]) for n in names[:-1]]), 0).tolist()))
    selection: dict[str, list[int]] = {n: [] for n in names}
    for idx in chosen.tolist():
        name = names[int(owner[idx])]
        selection[name].append(idx - offset[name])
    selection = {n: sorted(r) for n, r in selection.items()}
    layers = _candidate_layers(model)
    average = _average_bit_width(layers, selection, low, high)
    quantize_neurons(model, selection, low_bit_width=low, high_bit_width=high, act_bit_width=act,
                     per_channel=per_channel)  # fmt: skip
    calibrate(model, dataloader, num_batches=calibrate_batches, batch_adapter=batch_adapter)
    result = FairMixedPrecisionResult(
        scores=scores,
        high_precision_neurons=selection,
        low_bit_width=low,
        high_bit_width=high,
        act_bit_width=act,
        high_precision_fraction=k / len(flat),
        average_bit_width=average,
        num_samples=samples,
        prediction_flip_rate=flip_rate,
    )
    return model, result
