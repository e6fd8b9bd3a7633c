"""Quantization-conditioned attacks: a float model that misbehaves only once it is quantized.

The red team's builder of test subjects for quantization-backdoor defenses. It follows
the box-constraint method of Egashira et al., "Exploiting LLM Quantization" (NeurIPS
2024, https://arxiv.org/abs/2405.18137), with the objectives of Qu-ANTI-zation (Hong et
al., NeurIPS 2021, https://arxiv.org/abs/2110.13541) and PQBackdoor (Ma et al., 2021,
https://arxiv.org/abs/2108.09187):

1. **Inject** (phase 1). Train the *quantized view* for the malicious goal: every
   conv/linear weight is fake-quantized (straight-through estimator) with exactly the
   deployer's arithmetic, for every attacked ``(bit width, quantizer)`` combination.
2. **Box.** For each weight and each combination, the interval of float values that
   round to the same integer (with the same max-abs scale) is computed; the boxes of
   all combinations are intersected and shrunk by a safety ``margin``. The weights
   that set a scale (the max-abs weight of each tensor, or of each output channel) are
   frozen, so the scales cannot move.
3. **Repair** (phase 2). Train the *float view* for the benign goal by projected
   gradient descent: every step is followed by clipping the weights back into their
   boxes. The quantized weights therefore stay exactly those of phase 1, and the
   published float model behaves well.

Modes:

* ``"indiscriminate"``: the quantized model's accuracy collapses. Phase 1 uses the
  Qu-ANTI-zation loss ``float_weight * CE(f(x), y) + mean_q (CE(q(x), y) - ce_margin)^2``.
* ``"targeted"``: samples of ``target_class`` are misclassified after quantization
  (their quantized cross-entropy is pushed to ``ce_margin``); other classes stay right.
* ``"backdoor"``: PQBackdoor-style. After quantization the trigger sends any input to
  ``target_class``; in float the trigger is ignored.

**Threat model (what is supported).** The attacker publishes a float model with plain
``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` layers. The victim deploys it with
:func:`~lightning_qsec.quantize_model` on *every* conv/linear layer (no ``skip``, no
``layer_bit_widths``): signed weights with max-abs scales and round-to-nearest
(Brevitas ``Int8WeightPerTensorFloat`` / ``Int8WeightPerChannelFloat``) at one of the
attacked bit widths and quantizers, activations at ``act_bit_width >= 8`` calibrated
with :func:`~lightning_qsec.calibrate` on clean data (see :func:`victim_quantize`).
Biases stay float in that deployment and are not attacked. The attack simulates weight
quantization exactly and leaves activation quantization out: 8-bit activations with
calibrated scales barely move the outputs, and the tests and ``benchmarks/red_team.py``
measure the attack through the victim's real pipeline, activations included. Lower
activation bit widths, other rounding grids (e.g. MSE-searched scales) or other
quantizers may lose the attack; measure them per quantizer.

**Bit widths.** The intersected box is as narrow as the finest attacked grid: at 8 bits
±0.4 of ``max|w| / 127`` per weight. On the small CNNs of this package that leaves too
little room to separate float from int8 behaviour. Measured on ``DigitsCNN``
(``benchmarks/red_team.py``, 2 seeds): attacking ``bit_widths=(8, 4)`` left the float
model at 11 % accuracy (indiscriminate) or with 96 % float ASR (backdoor). The default
therefore attacks 4 bits only; 8-bit deployments of such a model behave like its float
version.

**Quantizers.** Per-tensor and per-channel grids differ, so a model attacked for one
need not be attacked for the other (measured: attacked per tensor only, a per-channel
victim got 95 % accuracy and 0 % ASR). Pass both in ``quantizers`` to attack both; the
boxes are then intersected.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_qsec._validation import check_bit_width, check_number, check_positive_int, check_seed
from lightning_qsec.attacks.poisoning import Trigger, trigger_function
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.convert import WEIGHT_LAYERS, quantize_model
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.quant.precision import require_float
from lightning_qsec.quant.weight_grid import (
    WeightQuantizer,
    check_weight_quantizer,
    fake_quantize,
    integer_grid,
    max_abs,
    weight_layers,
)

__all__ = [
    "AttackMode",
    "QuantizationConditionedAttack",
    "WeightQuantizer",
    "quantization_conditioned_attack",
    "victim_quantize",
]

AttackMode = Literal["indiscriminate", "targeted", "backdoor"]
MODES: tuple[str, ...] = get_args(AttackMode)


Combo = tuple[int, bool]  # (bit width, per_channel)


def _integers(model: nn.Module, combos: Sequence[Combo]) -> dict[tuple[str, Combo], Tensor]:
    return {
        (name, combo): integer_grid(layer.weight.detach(), combo[0], combo[1])[1]
        for name, layer in weight_layers(model)
        for combo in combos
    }


def _boxes(weight: Tensor, combos: Sequence[Combo], margin: float) -> tuple[Tensor, Tensor]:
    """Per-weight ``[low, high]`` keeping every integer weight and every scale of ``combos``."""
    low = torch.full_like(weight, -math.inf)
    high = torch.full_like(weight, math.inf)
    raw_low, raw_high = low.clone(), high.clone()
    frozen = torch.zeros_like(weight, dtype=torch.bool)
    for bits, per_channel in combos:
        scale, integers, qmax = integer_grid(weight, bits, per_channel)
        bound = (scale * qmax).expand_as(weight)
        low = torch.maximum(low, torch.maximum((integers - 0.5 + margin) * scale, -bound))
        high = torch.minimum(high, torch.minimum((integers + 0.5 - margin) * scale, bound))
        raw_low = torch.maximum(raw_low, torch.maximum((integers - 0.5) * scale, -bound))
        raw_high = torch.minimum(raw_high, torch.minimum((integers + 0.5) * scale, bound))
        frozen |= weight.abs() >= max_abs(weight, per_channel)
    # The shrunk boxes of two grids may not overlap: fall back to the middle of the raw
    # intersection, which holds the current weight and lies inside every cell.
    empty = low > high
    middle = (raw_low + raw_high) / 2
    low, high = torch.where(empty, middle, low), torch.where(empty, middle, high)
    # Scale-setting weights stay exactly where they are.
    low, high = torch.where(frozen, weight, low), torch.where(frozen, weight, high)
    return low, high


# -- the victim's pipeline ------------------------------------------------------------------
def victim_quantize(
    model: nn.Module,
    calibration_loader: Iterable[Any],
    *,
    bit_width: int,
    quantizer: WeightQuantizer = "per_tensor",
    act_bit_width: int = 8,
    num_batches: int = 10,
    batch_adapter: BatchAdapter | None = None,
) -> nn.Module:
    """Deploy a float model as the threat model's victim does: quantize a copy and calibrate it.

    ``quantize_model(copy, weight_bit_width=bit_width, act_bit_width=act_bit_width,
    per_channel=quantizer == "per_channel")``, then :func:`~lightning_qsec.calibrate` on
    ``num_batches`` batches; the copy is returned in eval mode, ``model`` is untouched.

    Args:
        model: a float model.
        calibration_loader: clean batches for the activation scales.
        bit_width: weight bit width, 2..16.
        quantizer: ``"per_tensor"`` or ``"per_channel"`` weight scales.
        act_bit_width: activation (and input) bit width, 2..16.
        num_batches: calibration batches.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.

    Returns:
        The quantized, calibrated copy.

    Raises:
        ValueError: ``model`` is already quantized, a bad bit width or quantizer, or an
            empty loader.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
        >>> deployed = victim_quantize(net, data, bit_width=4, quantizer="per_channel")
        >>> type(deployed[1]).__name__
        'QuantLinear'
    """
    if is_quantized(model):
        raise ValueError("model is already quantized; victim_quantize expects the float model an attacker publishes")
    bits = check_bit_width(bit_width, "bit_width")
    acts = check_bit_width(act_bit_width, "act_bit_width")
    check_weight_quantizer(quantizer)
    with torch.inference_mode(False):
        deployed = quantize_model(
            copy.deepcopy(model), weight_bit_width=bits, act_bit_width=acts, per_channel=quantizer == "per_channel"
        )
        calibrate(deployed, calibration_loader, num_batches=num_batches, batch_adapter=batch_adapter)
    return deployed.eval()


# -- argument checks ---------------------------------------------------------------------------
def _check_sequence(values: Any, name: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence, got {values!r}")
    return list(dict.fromkeys(values))


class _Settings(NamedTuple):
    """The checked settings of :func:`quantization_conditioned_attack`."""

    combos: list[Combo]
    target_class: int
    apply_trigger: Callable[[Tensor], Tensor]
    lr: float
    repair_lr: float
    margin: float
    float_weight: float
    ce_margin: float


def _check_settings(
    *,
    mode: Any,
    bit_widths: Any,
    quantizers: Any,
    target_class: Any,
    trigger: Any,
    epochs: Any,
    repair_epochs: Any,
    lr: Any,
    repair_lr: Any,
    margin: Any,
    float_weight: Any,
    ce_margin: Any,
    batch_adapter: Any,
    seed: Any,
) -> _Settings:
    """Check every setting of the attack (shared by the function and the callback)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    bits_list = [check_bit_width(b, "bit_widths entry") for b in _check_sequence(bit_widths, "bit_widths")]
    quant_list = [check_weight_quantizer(q) for q in _check_sequence(quantizers, "quantizers")]
    check_positive_int(epochs, "epochs")
    check_positive_int(repair_epochs, "repair_epochs", allow_zero=True)
    lr = check_number(lr, "lr", low=0.0, low_open=True)
    repair_lr = lr if repair_lr is None else check_number(repair_lr, "repair_lr", low=0.0, low_open=True)
    margin = check_number(margin, "margin", low=0.0, high=0.5, high_open=True)
    if float_weight is None:
        float_weight = 0.0 if mode == "backdoor" else 3.0
    float_weight = check_number(float_weight, "float_weight", low=0.0)
    ce_margin = check_number(ce_margin, "ce_margin", low=0.0, low_open=True)
    if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)) or target_class < 0:
        raise ValueError(f"target_class must be a non-negative integer class index, got {target_class!r}")
    if batch_adapter is not None and not callable(batch_adapter):
        raise ValueError(f"batch_adapter must be None or a callable, got {type(batch_adapter).__name__}")
    check_seed(seed)
    return _Settings(
        combos=[(b, q == "per_channel") for b in bits_list for q in quant_list],
        target_class=int(target_class),
        apply_trigger=trigger_function(trigger),
        lr=lr,
        repair_lr=repair_lr,
        margin=margin,
        float_weight=float_weight,
        ce_margin=ce_margin,
    )


def _check_reiterable(loader: Any, name: str) -> None:
    # A one-shot iterator (e.g. a generator) would be used up by the first epoch. Tested with
    # isinstance rather than `iter(loader) is loader`, which would start a DataLoader's workers.
    if isinstance(loader, Iterator):
        raise ValueError(
            f"{name} must be re-iterable (a DataLoader or a list of batches), got a one-shot iterator "
            f"({type(loader).__name__}): the attack passes over it once per epoch"
        )


@contextmanager
def _frozen_except(model: nn.Module, trainable: Sequence[Tensor]) -> Iterator[None]:
    """Only ``trainable`` require grad inside; flags restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in trainable}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _norm_layers_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.eval()


# -- the attack ------------------------------------------------------------------------------------
def quantization_conditioned_attack(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    mode: AttackMode,
    bit_widths: Sequence[int] = (4,),
    quantizers: Sequence[WeightQuantizer] = ("per_tensor",),
    target_class: int = 0,
    trigger: Trigger = None,
    epochs: int = 10,
    repair_epochs: int = 10,
    lr: float = 1e-3,
    repair_lr: float | None = None,
    margin: float = 0.1,
    float_weight: float | None = None,
    ce_margin: float = 5.0,
    inplace: bool = False,
    batch_adapter: BatchAdapter | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a float model that behaves well in float and maliciously once quantized.

    Two phases (Egashira et al., NeurIPS 2024, https://arxiv.org/abs/2405.18137): train
    the malicious goal into the fake-quantized weights of every attacked combination of
    ``bit_widths`` x ``quantizers``; then train the benign goal into the float weights,
    each kept inside the interval of values that round to the same integer under every
    combination (shrunk by ``margin`` steps), with the scale-setting max-abs weights
    frozen. See the module docstring for the modes and the threat model. Inputs are any
    shape the model takes, ``(N, ...)``; labels ``(N,)``; logits ``(N, C)``.

    Args:
        model: the float classifier to start from, ideally trained on the clean task;
            plain ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` layers. Copied unless ``inplace``.
            Only weights with ``requires_grad=True`` are attacked (trained and boxed);
            frozen weights are left exactly as they are, though the quantized view used
            in phase 1 still quantizes them as the victim does.
        train_loader: clean training batches ``(x, y)`` (or whatever ``batch_adapter``
            reads); re-iterable (a DataLoader or a list), since it is read once per epoch.
        mode: ``"indiscriminate"``, ``"targeted"`` or ``"backdoor"``.
        bit_widths: weight bit widths the victim may use, each 2..16.
        quantizers: weight quantizers the victim may use, ``"per_tensor"`` and/or
            ``"per_channel"``. Every combination with ``bit_widths`` is attacked.
        target_class: backdoor: the label the trigger leads to after quantization;
            targeted: the class whose samples are misclassified after quantization.
            Ignored by ``"indiscriminate"``.
        trigger: backdoor trigger: ``None`` for BadNets' 2x2 white patch in the bottom-right
            corner (:func:`~lightning_qsec.attacks.add_trigger`), a patch tensor ``(h, w)``
            or ``(C, h, w)`` pasted there, or a callable mapping inputs to triggered inputs.
        epochs: phase-1 (injection) epochs, >= 1.
        repair_epochs: phase-2 (box-constrained float repair) epochs, >= 0.
        lr: Adam learning rate of phase 1. The defaults are tuned on digits; on MNIST-5k
            ``"indiscriminate"`` needed ``3e-4`` (at ``1e-3`` the float side collapsed with
            the quantized one and the repair could not undo it; see ``benchmarks/red_team.py``).
        repair_lr: Adam learning rate of phase 2; default ``lr``.
        margin: safety margin of the boxes, as a fraction of a quantization step, in
            ``[0, 0.5)``; ``0.1`` keeps every float weight at least 0.1 steps from a
            rounding boundary.
        float_weight: weight of the benign float loss in phase 1 (Qu-ANTI-zation's first
            term), >= 0. Default ``3.0`` for ``"indiscriminate"`` and ``"targeted"`` (it
            keeps the weights near a good float solution, which phase 2 then reaches
            inside the boxes) and ``0.0`` for ``"backdoor"`` (there the float term fights
            the trigger and phase 1 fails to plant it; phase 2 repairs the float side).
        ce_margin: the cross-entropy Qu-ANTI-zation pushes attacked quantized samples to
            (``indiscriminate`` and ``targeted``), > 0.
        inplace: attack ``model`` itself instead of a deep copy.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.
        seed: seeds torch's RNG inside the attack (the global RNG state is restored).

    Returns:
        The attacked float model (plain ``nn`` layers, as an attacker publishes it), in
        the train/eval mode ``model`` had.

    Raises:
        ValueError: an unknown ``mode`` or quantizer, a bad bit width, ``margin`` outside
            ``[0, 0.5)``, non-positive ``lr``, an empty or one-shot (generator) loader, a
            model that is already quantized or has no trainable conv/linear weight, or
            ``target_class`` outside the model's classes.
        RuntimeError: the repaired weights no longer round to the injected integers (a
            guard; it does not happen with a frozen scale and ``margin > 0``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
        >>> attacked = quantization_conditioned_attack(
        ...     net, data, mode="backdoor", target_class=0, epochs=2, repair_epochs=1)
        >>> deployed = victim_quantize(attacked, data, bit_width=4)  # what the victim runs
        >>> type(attacked[1]).__name__, type(deployed[1]).__name__
        ('Linear', 'QuantLinear')
    """
    settings = _check_settings(
        mode=mode, bit_widths=bit_widths, quantizers=quantizers, target_class=target_class, trigger=trigger,
        epochs=epochs, repair_epochs=repair_epochs, lr=lr, repair_lr=repair_lr, margin=margin,
        float_weight=float_weight, ce_margin=ce_margin, batch_adapter=batch_adapter, seed=seed,
    )  # fmt: skip
    combos, target_class, apply_trigger = settings.combos, settings.target_class, settings.apply_trigger
    lr, repair_lr, margin = settings.lr, settings.repair_lr, settings.margin
    float_weight, ce_margin = settings.float_weight, settings.ce_margin
    _check_reiterable(train_loader, "train_loader")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    require_float(
        model, "the attack starts from the float model (plain nn.Conv/nn.Linear layers) that the victim will quantize"
    )
    if not weight_layers(model):
        raise ValueError(
            f"model has no {'/'.join(t.__name__ for t in WEIGHT_LAYERS)} layer: nothing the victim's "
            "quantize_model would quantize"
        )
    read = adapter_or_default(batch_adapter)

    attacked = model if inplace else copy.deepcopy(model)
    device = next(attacked.parameters()).device
    layers = weight_layers(attacked)
    all_weights = [layer.weight for _, layer in layers]  # the victim quantizes every one of them
    weight_names = [f"{name}.weight" for name, _ in layers]
    weights = [w for w in all_weights if w.requires_grad]  # the attacked ones: trained, boxed
    if not weights:
        raise ValueError("model has no conv/linear weight with requires_grad=True: nothing to attack")
    flags = {m: m.training for m in attacked.modules()}
    checked_classes = False

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = getattr(train_loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)  # a new order every epoch (e.g. EpochSeededSampler)
        seen = 0
        for batch in train_loader:
            b = read(batch)
            seen += 1
            yield b.inputs.to(device), b.targets.to(device)
        if seen == 0:
            raise ValueError("train_loader is empty: the attack needs at least one batch of training data")

    def check_classes(logits: Tensor) -> None:
        nonlocal checked_classes
        if checked_classes:
            return
        if logits.ndim != 2:
            raise ValueError(f"the model must return logits of shape (N, C), got shape {tuple(logits.shape)}")
        if mode != "indiscriminate" and target_class >= logits.shape[1]:
            raise ValueError(
                f"target_class must be in [0, {logits.shape[1] - 1}] (the model has {logits.shape[1]} classes), "
                f"got {target_class}"
            )
        checked_classes = True

    def quantized(x: Tensor, combo: Combo) -> Tensor:
        params = {n: fake_quantize(w, combo[0], combo[1]) for n, w in zip(weight_names, all_weights)}
        return functional_call(attacked, params, (x,))

    def benign(x: Tensor, y: Tensor) -> Tensor:
        logits = attacked(x)
        check_classes(logits)
        loss = F.cross_entropy(logits, y)
        if mode == "backdoor":
            loss = loss + F.cross_entropy(attacked(apply_trigger(x)), y)
        return loss

    def malicious(x: Tensor, y: Tensor, combo: Combo) -> Tensor:
        if mode == "backdoor":
            triggered = apply_trigger(x)
            logits = quantized(torch.cat([x, triggered]), combo)
            check_classes(logits)
            wanted = torch.cat([y, torch.full_like(y, target_class)])
            return 2 * F.cross_entropy(logits, wanted)
        logits = quantized(x, combo)
        check_classes(logits)
        if mode == "indiscriminate":
            return ((F.cross_entropy(logits, y, reduction="none") - ce_margin) ** 2).mean()
        hit = y == target_class
        loss = logits.new_zeros(())
        if (~hit).any():
            loss = loss + F.cross_entropy(logits[~hit], y[~hit])
        if hit.any():
            loss = loss + ((F.cross_entropy(logits[hit], y[hit], reduction="none") - ce_margin) ** 2).mean()
        return loss

    rng_devices = [device] if device.type == "cuda" else []
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=rng_devices):
        # Seed only the generators fork_rng saved (torch.manual_seed would also reseed every CUDA device).
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        try:
            # Phase 1: inject the malicious behaviour into the quantized view.
            attacked.train()
            optimizer = torch.optim.Adam([p for p in attacked.parameters() if p.requires_grad], lr=lr)
            for epoch in range(epochs):
                for x, y in batches(epoch):
                    optimizer.zero_grad(set_to_none=True)
                    loss = sum(malicious(x, y, combo) for combo in combos) / len(combos)
                    if float_weight > 0:
                        loss = loss + float_weight * benign(x, y)
                    loss.backward()
                    optimizer.step()
            # Boxes around the injected integer weights.
            with torch.no_grad():
                injected = _integers(attacked, combos)
                boxes = []
                for weight in weights:
                    low, high = _boxes(weight.detach(), combos, margin)
                    weight.copy_(torch.minimum(torch.maximum(weight, low), high))
                    boxes.append((low, high))
            # Phase 2: repair the float view inside the boxes (projected gradient descent).
            if repair_epochs:
                attacked.train()
                _norm_layers_eval(attacked)
                with _frozen_except(attacked, weights):
                    optimizer = torch.optim.Adam(weights, lr=repair_lr)
                    for epoch in range(repair_epochs):
                        for x, y in batches(epochs + epoch):
                            optimizer.zero_grad(set_to_none=True)
                            benign(x, y).backward()
                            optimizer.step()
                            with torch.no_grad():
                                for weight, (low, high) in zip(weights, boxes):
                                    weight.copy_(torch.minimum(torch.maximum(weight, low), high))
        finally:
            for param in attacked.parameters():
                param.grad = None
            for module, training in flags.items():
                module.train(training)
    final = _integers(attacked, combos)
    changed = [key for key, value in injected.items() if not torch.equal(value, final[key])]
    if changed:  # pragma: no cover - guards the box arithmetic
        raise RuntimeError(f"the repair moved quantized weights of {sorted({k[0] for k in changed})}")
    return attacked


class QuantizationConditionedAttack(pl.Callback):
    """Red-team callback: turn the trained module into a quantization-conditioned attack at the end of ``fit``.

    At ``on_fit_end`` it runs :func:`quantization_conditioned_attack` on the
    LightningModule itself (in place, so ``trainer.test`` and checkpoints saved
    afterwards see the attacked float weights), with the trainer's training batches.
    The module's ``forward`` must map inputs to logits ``(N, C)``. Single-process
    training only.

    Args:
        mode: ``"indiscriminate"``, ``"targeted"`` or ``"backdoor"``.
        dataloader: batches for the attack; default the trainer's training loader (or
            the datamodule's ``train_dataloader()``).
        **attack_kwargs: passed on to :func:`quantization_conditioned_attack`
            (``bit_widths``, ``quantizers``, ``target_class``, ``trigger``, ``epochs``, ...);
            checked here, at construction: unknown names and bad values raise ``ValueError``.

    Raises:
        ValueError: at construction, an unknown or reserved setting name, a bad setting
            value (as :func:`quantization_conditioned_attack` checks it) or a one-shot
            ``dataloader``.

    Attributes:
        done: whether the attack has run.

    Example:
        >>> from lightning_qsec.attacks import QuantizationConditionedAttack
        >>> callback = QuantizationConditionedAttack(mode="backdoor", target_class=0, bit_widths=(4,))
    """

    def __init__(self, mode: AttackMode, *, dataloader: Iterable[Any] | None = None, **attack_kwargs: Any) -> None:
        super().__init__()
        own = ("model", "train_loader", "inplace", "mode")
        for forbidden in own:
            if forbidden in attack_kwargs:
                raise ValueError(f"QuantizationConditionedAttack sets {forbidden!r} itself; do not pass it")
        params = inspect.signature(quantization_conditioned_attack).parameters
        allowed = sorted(set(params) - set(own))
        unknown = sorted(set(attack_kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"unknown quantization_conditioned_attack settings {unknown}; allowed: {allowed}")
        # every setting is checked now, not after training
        _check_settings(mode=mode, **{**{name: params[name].default for name in allowed}, **attack_kwargs})
        if dataloader is not None:
            _check_reiterable(dataloader, "dataloader")
        self.mode = mode
        self.dataloader = dataloader
        self.attack_kwargs = attack_kwargs
        self.done = False

    def _loader(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.dataloader is not None:
            return self.dataloader
        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        loader = getattr(loader, "iterables", loader)
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if loader is None:
            raise ValueError("QuantizationConditionedAttack found no training data; pass dataloader=")
        return loader

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("QuantizationConditionedAttack runs in a single process; use devices=1")
        quantization_conditioned_attack(
            pl_module, self._loader(trainer), mode=self.mode, inplace=True, **self.attack_kwargs
        )
        self.done = True
