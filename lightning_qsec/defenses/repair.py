"""Repair a quantization-conditioned backdoor before deployment: :func:`repair_quantization_backdoor`.

A model attacked by :func:`~lightning_qsec.attacks.quantization_conditioned_attack` (or by
Qu-ANTI-zation / PQBackdoor-style training) behaves well in float and badly once the
deployer rounds its weights to the nearest grid point. The repair keeps the deployer's
quantizer and bit width and changes *which integers* the weights get, using only clean
calibration data and the float model as a reference. Methods:

* ``"flip_rounding"``: EFRAP (Li et al., CVPR 2024, https://arxiv.org/abs/2405.12725):
  learned rounding (up or down instead of nearest), guided by neuron-wise truncation
  errors toward the flipped rounding, with layer-wise activation preservation.
* ``"activation_alignment"``: after LAC (Li et al., ICML 2024,
  https://proceedings.mlr.press/v235/li24e.html): integer weights (on the same grid) and
  float biases trained so that every layer's quantized activations align with the float
  ones.
* ``"finetune"``: plain quantization-aware fine-tuning on the labelled calibration data
  (the baseline).

**What comes back.** :class:`RepairResult` holds ``model``, the repaired *quantized*
model, deployed with the deployer's own pipeline (:func:`~lightning_qsec.attacks.victim_quantize`:
``quantize_model(weight_bit_width=bit_width, act_bit_width=act_bit_width,
per_channel=quantizer == "per_channel")`` + ``calibrate`` on the calibration batches),
ready to run at ``bit_width``; and ``float_model``, a float model (plain ``nn`` layers)
whose deployment by that same pipeline gives exactly ``model``'s integer weights (for
``flip_rounding`` and ``activation_alignment`` its weights are ``scale * integer``, on the
grid, so its float behaviour is the repaired quantized behaviour without activation
rounding). A guard checks that the deployed integers are the chosen ones. The repair is
specific to that bit width and quantizer: deploy ``float_model`` at another precision and
the repair does not carry over.

**Report.** :class:`RepairReport` compares the float model, the deployment *before*
repair (nearest rounding) and *after*, on ``eval_loader`` (default: the calibration
batches): clean accuracy, agreement of quantized and float predictions, and, when a
``trigger`` and ``target_class`` are given, BackdoorBench's attack success rate (triggered
samples outside the target class classified as the target,
:class:`~lightning_qsec.metrics.AttackSuccessRate` with ``targeted=True``) and defense
effectiveness rate (:func:`~lightning_qsec.metrics.functional.defense_effectiveness_rate`).

**Threat model.** As :func:`~lightning_qsec.attacks.quantization_conditioned_attack`'s:
every conv/linear layer quantized, signed max-abs weight scales, round-to-nearest,
activations at ``act_bit_width`` calibrated on clean data. Weight rounding is optimised
without activation quantization (at 8 bits it barely moves outputs); every number in the
report comes from the real deployed model, activations included.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_qsec._eval import eval_mode
from lightning_qsec._validation import check_bit_width, check_number, check_positive_int, check_seed
from lightning_qsec.attacks.poisoning import trigger_function
from lightning_qsec.attacks.quantization_conditioned import victim_quantize
from lightning_qsec.batch import BatchAdapter
from lightning_qsec.defenses._activation_alignment import activation_alignment
from lightning_qsec.defenses._flip_rounding import flip_rounding
from lightning_qsec.defenses._qat_finetune import qat_finetune
from lightning_qsec.defenses._repair_grid import Calibration, LayerGrid, layer_grids, read_calibration
from lightning_qsec.metrics.attack_success_rate import AttackSuccessRate
from lightning_qsec.metrics.backdoor import CleanAccuracy
from lightning_qsec.metrics.functional.backdoor import defense_effectiveness_rate
from lightning_qsec.quant.convert import WEIGHT_LAYERS
from lightning_qsec.quant.precision import require_float
from lightning_qsec.quant.weight_grid import WeightQuantizer, check_weight_quantizer, integer_grid, weight_layers

__all__ = [
    "RepairMethod", "RepairReport", "RepairResult", "RepairSettings", "repair_quantization_backdoor", "repair_settings",
]

RepairMethod = Literal["flip_rounding", "activation_alignment", "finetune"]
METHODS: tuple[str, ...] = get_args(RepairMethod)
Trigger = Tensor | Callable[[Tensor], Tensor] | None

#: Per-method defaults for ``steps`` and ``lr`` (tuned on digits, see benchmarks/backdoor_repair.py).
DEFAULTS: dict[str, dict[str, float]] = {
    "flip_rounding": {"steps": 300, "lr": 0.05},
    "activation_alignment": {"steps": 300, "lr": 0.01},
    "finetune": {"steps": 300, "lr": 1e-4},
}


@dataclass(frozen=True)
class RepairReport:
    """Before/after numbers of one repair; rates are fractions in ``[0, 1]``.

    Attributes:
        method: the repair method.
        bit_width: weight bit width of the deployment.
        quantizer: ``"per_tensor"`` or ``"per_channel"`` weight scales.
        act_bit_width: activation bit width of the deployment.
        eval_samples: samples in the evaluation data.
        clean_acc_float: clean accuracy of the float model given to the repair.
        clean_acc_before: clean accuracy of the plain (nearest-rounding) deployment.
        clean_acc_after: clean accuracy of the repaired deployment.
        agreement_before: share of clean samples where the plain deployment predicts what the float model does.
        agreement_after: the same for the repaired deployment.
        asr_float: attack success rate of the float model (``None`` without a trigger).
        asr_before: attack success rate of the plain deployment.
        asr_after: attack success rate of the repaired deployment.
        der: BackdoorBench's defense effectiveness rate, before -> after (``None`` without a trigger).
        changed_weights: share of weights whose integer differs from nearest rounding.
        seconds: wall time of the repair (evaluation excluded).
    """

    method: str
    bit_width: int
    quantizer: str
    act_bit_width: int
    eval_samples: int
    clean_acc_float: float
    clean_acc_before: float
    clean_acc_after: float
    agreement_before: float
    agreement_after: float
    asr_float: float | None
    asr_before: float | None
    asr_after: float | None
    der: float | None
    changed_weights: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair_quantization_backdoor` returns.

    Attributes:
        model: the repaired quantized model, deployed by the deployer's pipeline at
            ``bit_width`` (Brevitas layers, calibrated, eval mode).
        float_model: a float model whose deployment at ``bit_width`` with the same
            quantizer gives ``model``'s integer weights.
        report: before/after numbers.
    """

    model: nn.Module
    float_model: nn.Module
    report: RepairReport


@dataclass(frozen=True)
class RepairSettings:
    """The checked settings of one repair (see :func:`repair_quantization_backdoor` for each).

    ``steps`` and ``lr`` hold the method's defaults where none were given; ``trigger`` is
    the stamping function (``None`` without a trigger).
    """

    method: str
    bit_width: int
    quantizer: WeightQuantizer
    act_bit_width: int
    trigger: Callable[[Tensor], Tensor] | None
    target_class: int | None
    num_batches: int
    eval_batches: int | None
    steps: int
    lr: float
    batch_size: int
    flip_weight: float
    round_weight: float
    seed: int


def repair_settings(
    *,
    bit_width: int,
    method: RepairMethod = "flip_rounding",
    quantizer: WeightQuantizer = "per_tensor",
    act_bit_width: int = 8,
    trigger: Trigger = None,
    target_class: int | None = None,
    num_batches: int = 10,
    eval_batches: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    flip_weight: float = 0.1,
    round_weight: float = 0.01,
    seed: int = 0,
) -> RepairSettings:
    """Check the settings of :func:`repair_quantization_backdoor` and return them normalised.

    The function and the :class:`~lightning_qsec.callbacks.QuantizationBackdoorRepair`
    callback both call it, so the callback refuses a bad setting when it is built, not
    after training. The defaults are the function's.

    Raises:
        ValueError: naming the bad argument and its allowed values.

    Example:
        >>> s = repair_settings(bit_width=4, method="finetune")
        >>> s.steps, s.lr, s.quantizer
        (300, 0.0001, 'per_tensor')
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if (trigger is None) != (target_class is None):
        raise ValueError(
            "trigger and target_class go together: pass both to measure the attack success rate, or neither"
        )
    bad_class = isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0
    if target_class is not None and bad_class:
        raise ValueError(f"target_class must be a non-negative integer class index, got {target_class!r}")
    return RepairSettings(
        method=method,
        bit_width=check_bit_width(bit_width, "bit_width"),
        quantizer=check_weight_quantizer(quantizer),
        act_bit_width=check_bit_width(act_bit_width, "act_bit_width"),
        trigger=trigger_function(trigger) if trigger is not None else None,
        target_class=target_class,
        num_batches=check_positive_int(num_batches, "num_batches"),
        eval_batches=None if eval_batches is None else check_positive_int(eval_batches, "eval_batches"),
        steps=check_positive_int(int(DEFAULTS[method]["steps"]) if steps is None else steps, "steps"),
        lr=check_number(DEFAULTS[method]["lr"] if lr is None else lr, "lr", low=0.0, low_open=True),
        batch_size=check_positive_int(batch_size, "batch_size"),
        flip_weight=check_number(flip_weight, "flip_weight", low=0.0),
        round_weight=check_number(round_weight, "round_weight", low=0.0),
        seed=check_seed(seed),
    )


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    require_float(
        model, "repair_quantization_backdoor expects the float model (plain nn.Conv/nn.Linear layers) that the "
        "deployer is about to quantize"
    )
    if not weight_layers(model):
        raise ValueError(f"model has no {'/'.join(t.__name__ for t in WEIGHT_LAYERS)} layer: nothing to repair")
    return model


@torch.no_grad()
def _evaluate(
    model: nn.Module, data: Calibration, trigger: Callable[[Tensor], Tensor] | None, target_class: int | None
) -> tuple[float, float | None, Tensor]:
    """(clean accuracy, BackdoorBench ASR or None, clean predictions of every sample)."""
    assert data.targets is not None
    accuracy = CleanAccuracy()
    asr = AttackSuccessRate(targeted=True)
    preds = []
    with eval_mode(model):
        for x, y in zip(data.inputs, data.targets):
            logits = model(x).cpu()  # the metrics live on the CPU, whatever the model's device
            preds.append(logits.argmax(1))
            accuracy.update(logits, y.cpu())
            if trigger is not None:
                asr.update(logits, model(trigger(x)).cpu(), y.cpu(), attack_target=target_class)
    rate = float(asr.compute()) if trigger is not None else None
    return float(accuracy.compute()), rate, torch.cat(preds)


def _deploy(
    model: nn.Module, data: Calibration, bit_width: int, quantizer: WeightQuantizer, act_bit_width: int
) -> nn.Module:
    pairs = data.labelled()
    return victim_quantize(
        model, pairs, bit_width=bit_width, quantizer=quantizer, act_bit_width=act_bit_width, num_batches=len(pairs)
    )


def _check_deployed(
    deployed: nn.Module, grids: list[LayerGrid], bit_width: int, per_channel: bool, *, fixed: bool
) -> None:
    """Guard: the deployer's quantizer gives the integers the repair stored (on the original grid if ``fixed``)."""
    for grid in grids:
        stored = grid.layer.weight.detach()
        expected = integer_grid(stored, bit_width, per_channel)[1]
        got = deployed.get_submodule(grid.name).quant_weight().int().to(expected.dtype)
        chosen = torch.round(stored / grid.scale) if fixed else expected
        if not (torch.equal(got, expected) and torch.equal(got, chosen)):
            raise RuntimeError(f"the deployed integer weights of {grid.name} differ from the repaired ones")


def repair_quantization_backdoor(
    model: nn.Module,
    calibration_loader: Iterable[Any],
    *,
    bit_width: int,
    method: RepairMethod = "flip_rounding",
    quantizer: WeightQuantizer = "per_tensor",
    act_bit_width: int = 8,
    eval_loader: Iterable[Any] | None = None,
    trigger: Trigger = None,
    target_class: int | None = None,
    num_batches: int = 10,
    eval_batches: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    flip_weight: float = 0.1,
    round_weight: float = 0.01,
    batch_adapter: BatchAdapter | None = None,
    seed: int = 0,
) -> RepairResult:
    """Repair a float model's quantization-conditioned backdoor for one deployment precision.

    See the module docstring for the methods, what is returned and the threat model.
    The input model is never changed. Inputs are any shape the model takes, ``(N, ...)``;
    labels ``(N,)``; logits ``(N, C)``.

    Args:
        model: the float model the deployer is about to quantize (plain
            ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` layers).
        calibration_loader: clean batches; ``(x, y)`` (or what ``batch_adapter`` reads),
            or bare input tensors ``x`` for ``"flip_rounding"`` and
            ``"activation_alignment"``, which need no labels. ``"finetune"`` needs labels.
        bit_width: the deployer's weight bit width, 2..16.
        method: ``"flip_rounding"``, ``"activation_alignment"`` or ``"finetune"``.
        quantizer: the deployer's weight quantizer, ``"per_tensor"`` or ``"per_channel"``.
        act_bit_width: the deployer's activation bit width, 2..16.
        eval_loader: labelled clean batches for the report; default the calibration
            batches (which then must have labels).
        trigger: backdoor trigger for the attack success rate: a patch tensor ``(h, w)``
            or ``(C, h, w)`` pasted in the bottom-right corner, or a callable mapping inputs
            to triggered inputs. ``None``: no ASR, the report has clean accuracy and
            float-vs-quantized agreement only.
        target_class: the backdoor's target class; required with ``trigger``.
        num_batches: calibration batches taken from ``calibration_loader``, >= 1.
        eval_batches: batches taken from ``eval_loader``; default all.
        steps: optimisation steps (per layer for ``"flip_rounding"``); default 300.
        lr: Adam learning rate; default 0.05 (``flip_rounding``, on the rounding
            variables), 0.01 (``activation_alignment``, in grid steps) or 1e-4 (``finetune``).
        batch_size: samples per optimisation step, >= 1.
        flip_weight: ``flip_rounding``: weight of the error-guided flipping term, >= 0.
        round_weight: ``flip_rounding``: weight of AdaRound's rounding regulariser, >= 0.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.
        seed: seeds torch's RNG inside the repair (the global RNG state is restored).

    Returns:
        :class:`RepairResult` with the deployed repaired model, its float twin and the report.

    Raises:
        ValueError: a float model was expected but ``model`` is quantized (or has no
            conv/linear layer); an unknown ``method`` or ``quantizer``; a bit width outside
            2..16; an empty loader; a loader without labels where labels are needed;
            ``trigger`` without ``target_class`` (or the reverse); a bad number.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
        >>> result = repair_quantization_backdoor(net, data, bit_width=4, steps=20)
        >>> type(result.model[1]).__name__, type(result.float_model[1]).__name__
        ('QuantLinear', 'Linear')
        >>> sorted(result.report.to_dict())[:3]
        ['act_bit_width', 'agreement_after', 'agreement_before']
    """
    model = _check_model(model)
    settings = repair_settings(
        bit_width=bit_width, method=method, quantizer=quantizer, act_bit_width=act_bit_width, trigger=trigger,
        target_class=target_class, num_batches=num_batches, eval_batches=eval_batches, steps=steps, lr=lr,
        batch_size=batch_size, flip_weight=flip_weight, round_weight=round_weight, seed=seed,
    )
    bits, acts, quantizer = settings.bit_width, settings.act_bit_width, settings.quantizer
    steps, lr, apply_trigger = settings.steps, settings.lr, settings.trigger
    per_channel = quantizer == "per_channel"
    device = next(model.parameters()).device

    calibration = read_calibration(calibration_loader, num_batches, device, batch_adapter, "calibration_loader")
    if method == "finetune" and calibration.targets is None:
        raise ValueError("calibration_loader yields batches without labels; method='finetune' needs (x, y) batches")
    if eval_loader is None:
        if calibration.targets is None:
            raise ValueError(
                "calibration_loader yields batches without labels, so the report needs eval_loader= with (x, y) batches"
            )
        evaluation = calibration
    else:
        evaluation = read_calibration(eval_loader, eval_batches or 2**62, device, batch_adapter, "eval_loader")
        if evaluation.targets is None:
            raise ValueError("eval_loader yields batches without labels; the report needs (x, y) batches")

    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        repaired = copy.deepcopy(model).eval()
        grids = layer_grids(repaired, bits, per_channel)
        start = time.perf_counter()
        with torch.enable_grad():
            if method == "flip_rounding":
                flip_rounding(repaired, reference, grids, calibration.inputs, steps=steps, lr=lr,
                              batch_size=batch_size, flip_weight=settings.flip_weight,
                              round_weight=settings.round_weight)
            elif method == "activation_alignment":
                activation_alignment(repaired, reference, grids, calibration.inputs, steps=steps, lr=lr,
                                     batch_size=batch_size)
            else:
                assert calibration.targets is not None
                qat_finetune(repaired, grids, calibration.inputs, calibration.targets, bit_width=bits,
                             per_channel=per_channel, steps=steps, lr=lr, batch_size=batch_size)
        seconds = time.perf_counter() - start
        for p in repaired.parameters():
            p.requires_grad_(False)
        before = _deploy(model, calibration, bits, quantizer, acts)
        after = _deploy(repaired, calibration, bits, quantizer, acts)
        _check_deployed(after, grids, bits, per_channel, fixed=method != "finetune")
        changed = sum(
            int((integer_grid(g.layer.weight.detach(), bits, per_channel)[1] != g.nearest).sum()) for g in grids
        ) / sum(g.nearest.numel() for g in grids)

        acc_f, asr_f, float_preds = _evaluate(reference, evaluation, apply_trigger, target_class)
        acc_b, asr_b, preds_b = _evaluate(before, evaluation, apply_trigger, target_class)
        acc_a, asr_a, preds_a = _evaluate(after, evaluation, apply_trigger, target_class)
        agree_b = float((preds_b == float_preds).float().mean())
        agree_a = float((preds_a == float_preds).float().mean())
    der = None
    if asr_b is not None and asr_a is not None:
        der = float(defense_effectiveness_rate(asr_before=asr_b, asr_after=asr_a, acc_before=acc_b, acc_after=acc_a))
    for p, q in zip(repaired.parameters(), model.parameters()):
        p.requires_grad_(q.requires_grad)
    for m, original in zip(repaired.modules(), model.modules()):
        m.train(original.training)
    report = RepairReport(
        method=method, bit_width=bits, quantizer=quantizer, act_bit_width=acts,
        eval_samples=sum(y.numel() for y in evaluation.targets or []),
        clean_acc_float=acc_f, clean_acc_before=acc_b, clean_acc_after=acc_a,
        agreement_before=agree_b, agreement_after=agree_a,
        asr_float=asr_f, asr_before=asr_b, asr_after=asr_a, der=der,
        changed_weights=changed, seconds=seconds,
    )
    return RepairResult(model=after, float_model=repaired, report=report)
