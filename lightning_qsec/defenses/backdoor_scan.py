"""Scan a float model for quantization-conditioned backdoors before it is deployed.

A model can be trained to behave well in float and to misbehave only after the victim
quantizes it (Qu-ANTI-zation, Hong et al., NeurIPS 2021, https://arxiv.org/abs/2110.13541;
PQBackdoor, Ma et al. 2021, https://arxiv.org/abs/2108.09187). Float-only detectors miss
these, and the attack depends on the exact quantizer. :func:`scan_model` therefore builds
the deployer's quantized twin at every bit width, with this package's own
:func:`~lightning_qsec.quantize_model` and :func:`~lightning_qsec.calibrate`, and
compares it with the float model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.defenses._scan_evidence import (
    anomaly_index,
    logits_of,
    prediction_evidence,
    reverse_engineer_triggers,
    strip_entropy,
    truncation_evidence,
)
from lightning_qsec.defenses._scan_settings import Quantizer, scan_settings
from lightning_qsec.defenses._scan_thresholds import EVIDENCE
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.convert import quantize_model
from lightning_qsec.quant.precision import require_float

__all__ = ["EVIDENCE", "Quantizer", "ScanResult", "scan_model"]

_CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan_model` found.

    Attributes:
        suspicious: ``score > threshold``.
        score: the largest evidence-to-threshold ratio over all evidence and bit widths.
        threshold: the score above which a model is suspicious (1.0: an evidence
            exceeded its calibrated threshold).
        evidence: bit width -> evidence name -> value (the names of
            :data:`~lightning_qsec.defenses.backdoor_scan.EVIDENCE`), plus the float and
            quantized accuracies on the scanned data and the reverse-engineered trigger
            sizes of the class whose trigger shrinks most from float to quantized
            (``trigger_norm_float``/``trigger_norm_quantized``, shares of the input
            pixels) and the share of the trigger-search inputs the quantized trigger
            sends there (``trigger_success_quantized``).
        thresholds: bit width -> evidence name -> threshold.
        suspect_classes: bit width -> the likeliest backdoor target at that precision:
            the class of the smallest quantized trigger when ``trigger_anomaly`` is
            further above (or nearer to) its threshold than ``trigger_ratio``, else the
            class whose trigger shrinks most from float to quantized.
        target_class: the suspect class of the bit width whose trigger evidence is
            strongest (the larger of ``trigger_ratio`` and ``trigger_anomaly`` relative
            to its threshold). Not that of the bit width with the highest overall
            score: at 8 bits a twin without a working backdoor can score highest through
            other evidence (e.g. truncation errors), and its suspect class is noise.
        flagged: ``"<bits>/<evidence>"`` for every evidence above its threshold.
        quantizer: the deployer's quantizer settings that were scanned.
        samples: clean samples scanned.
        seconds: wall time of the scan.
    """

    suspicious: bool
    score: float
    threshold: float
    evidence: dict[int, dict[str, float]]
    thresholds: dict[int, dict[str, float]]
    suspect_classes: dict[int, int]
    target_class: int | None
    flagged: list[str] = field(default_factory=list)
    quantizer: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (bit widths become string keys)."""
        return {
            "suspicious": self.suspicious,
            "score": self.score,
            "threshold": self.threshold,
            "target_class": self.target_class,
            "flagged": list(self.flagged),
            "evidence": {str(b): dict(e) for b, e in self.evidence.items()},
            "thresholds": {str(b): dict(t) for b, t in self.thresholds.items()},
            "suspect_classes": {str(b): c for b, c in self.suspect_classes.items()},
            "quantizer": dict(self.quantizer),
            "samples": self.samples,
            "seconds": self.seconds,
        }


def _collect(dataloader: Iterable[Any], read: BatchAdapter, max_samples: int) -> tuple[Tensor, Tensor]:
    xs, ys, n = [], [], 0
    for batch in dataloader:
        try:
            b = read(batch)
        except ValueError as error:
            raise ValueError(
                f"dataloader must yield labelled batches (x, y): scan_model needs the labels for the accuracies "
                f"and to leave each class's own inputs out of its trigger search. {error}"
            ) from error
        xs.append(b.inputs.detach().cpu().clone())
        ys.append(b.targets.detach().cpu().long().clone())
        n += len(ys[-1])
        if n >= max_samples:
            break
    if n == 0:
        raise ValueError("dataloader is empty: scan_model needs clean labelled batches to compare float and quantized")
    return torch.cat(xs)[:max_samples], torch.cat(ys)[:max_samples]


def _twin(model: nn.Module, x: Tensor, y: Tensor, config: QuantConfig, bits: int, batches: int) -> nn.Module:
    settings = config.to_dict()
    settings["weight_bit_width"] = bits
    twin = quantize_model(copy.deepcopy(model), **settings)
    step = _CALIBRATION_BATCH
    chunks = [(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step)]
    calibrate(twin, chunks, num_batches=batches)
    return twin.eval()


def scan_model(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    bit_widths: Sequence[int] = (8, 4),
    quantizer: QuantConfig | Quantizer = "per_tensor",
    act_bit_width: int | None = None,
    seed: int = 0,
    progress: bool = True,
    max_samples: int = 512,
    calibrate_batches: int = 10,
    trigger_samples: int = 10,
    trigger_steps: int = 50,
    trigger_lr: float = 0.2,
    trigger_cost: float = 1.0,
    strip_overlays: int = 8,
    thresholds: Mapping[int, Mapping[str, float]] | None = None,
    batch_adapter: BatchAdapter | None = None,
    on_twin: Callable[[int, nn.Module], object] | None = None,
) -> ScanResult:
    """Scan a float model for a backdoor that wakes up only once it is quantized.

    For each weight bit width the deployer's quantized twin is built on a deep copy of
    ``model`` (:func:`~lightning_qsec.quantize_model` with the ``quantizer`` settings,
    then :func:`~lightning_qsec.calibrate` on the scanned clean data); ``model`` itself is
    never changed (its parameters, ``requires_grad`` flags and train/eval modes are as
    before). Everything runs in eval mode, so no BatchNorm or Brevitas activation
    statistics are consumed. Evidence per bit width (the scan needs no trigger and no
    knowledge of the attack):

    1. **Predictions on clean data**: ``disagreement`` (share of predictions that change
       from float to quantized) and ``class_shift`` (total-variation distance between
       the predicted-class distributions). Qu-ANTI-zation-style attacks move many.
    2. **Truncation errors** (EFRAP, Li et al., CVPR 2024, https://arxiv.org/abs/2403.02717):
       ``truncation_outliers`` (share of neurons whose weights' mean rounding residual
       ``|w/s - round(w/s)|`` on the deployer's grid is abnormally large, Bonferroni-
       corrected over all neurons, and 0 below 3 such neurons: a single outlier neuron
       happens in clean models) and
       ``truncation_ks`` (largest distance of a layer's residuals from the uniform law).
       Weights tuned to the exact grid, as box-constrained attacks leave them, are not
       uniform there.
    3. **Trigger reverse-engineering against the quantized forward** (Neural Cleanse,
       Wang et al., S&P 2019): for every class the smallest mask-and-pattern trigger that
       sends ``trigger_samples`` clean inputs there, optimised through the twin (straight-
       through gradients) and, from the same start, through the float model.
       ``trigger_ratio`` is the largest
       ``log(float mask size / quantized mask size)`` over classes: a class far easier
       to reach after quantization than before. ``trigger_anomaly`` is Neural Cleanse's
       anomaly index of the smallest quantized mask, ``(median - min) / (1.4826 * MAD)``
       of the per-class mask sizes (the MAD floored at 10 % of the median, see
       :func:`~lightning_qsec.defenses._scan_evidence.anomaly_index`), from the same
       masks (no extra forward pass): it looks at the quantized model alone, so it sees
       a backdoor that works there whether or not the float model has it too (whose
       ``trigger_ratio`` stays small).
    4. **STRIP entropy** (Gao et al., ACSAC 2019, https://arxiv.org/abs/1902.06531): the
       trigger of the class that shrinks most is stamped on the clean inputs, which are then blended
       with ``strip_overlays`` random clean inputs each; ``strip_drop`` is the float
       model's normalised prediction entropy (with its own trigger) minus the twin's (with
       its trigger). A real backdoor trigger survives blending; an adversarial one does not.

    **Score.** Each evidence is divided by its threshold, calibrated on clean models only
    (see :mod:`lightning_qsec.defenses._scan_thresholds` and ``benchmarks/backdoor_scan.py
    --calibrate``); ``score`` is the largest ratio over evidence and bit widths, and the
    model is ``suspicious`` when ``score > 1``. Any single strong piece of evidence is
    enough, so an attack that hides one (e.g. an unconstrained one without grid-tuned
    weights) is still caught by the others. The thresholds were calibrated on small CNNs
    (digits, MNIST-5k) with per-tensor weights and 8-bit activations at 8 and 4 bits; for
    other models, quantizers or data, calibrate your own (pass ``thresholds=``).

    Args:
        model: the float classifier (plain ``nn.Conv``/``nn.Linear`` layers), returning
            logits ``(N, C)``.
        dataloader: clean labelled batches ``(x, y)`` (or what ``batch_adapter`` reads);
            the first ``max_samples`` samples are scanned and calibrate the twins.
        bit_widths: weight bit widths the deployer may use, each 2..16.
        quantizer: ``"per_tensor"`` or ``"per_channel"`` weight scales, or a full
            :class:`~lightning_qsec.QuantConfig` (its ``weight_bit_width`` is replaced by
            each entry of ``bit_widths``).
        act_bit_width: activation bit width with a string ``quantizer`` (default 8); leave
            it out with a ``QuantConfig``.
        seed: seeds the trigger search and STRIP's overlays (the global RNG is restored).
        progress: show a progress bar (tqdm).
        max_samples: clean samples to read from ``dataloader``.
        calibrate_batches: batches of 64 scanned samples that calibrate each twin.
        trigger_samples: clean inputs of the trigger search (the same for every class).
        trigger_steps: Adam steps of the trigger search.
        trigger_lr: Adam learning rate of the trigger search.
        trigger_cost: weight of the mask size in the trigger search.
        strip_overlays: clean inputs blended with each stamped input for STRIP.
        thresholds: bit width -> evidence name -> threshold, overriding the calibrated ones;
            integer keys among ``bit_widths``, thresholds finite and > 0.
        batch_adapter: optional callable turning a batch into a :class:`~lightning_qsec.Batch`.
        on_twin: called as ``on_twin(bits, twin)`` with each calibrated quantized twin
            (in eval mode, on the model's device) before it is discarded, so that a
            caller can measure the very twins the scan built (the
            :class:`~lightning_qsec.callbacks.BackdoorScan` hook measures clean accuracy
            and attack success on them). It must not change the twin.

    Returns:
        The :class:`ScanResult`.

    Raises:
        ValueError: ``model`` is already quantized, a bad bit width or quantizer, an
            empty ``dataloader`` or one without labels, or bad scan settings.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [(torch.rand(32, 1, 8, 8), torch.randint(0, 4, (32,)))]
        >>> result = scan_model(net, data, bit_widths=(8,), trigger_steps=5, progress=False)
        >>> sorted(result.evidence), result.threshold
        ([8], 1.0)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if on_twin is not None and not callable(on_twin):
        raise ValueError(f"on_twin must be None or a callable (bits, twin), got {type(on_twin).__name__}")
    require_float(
        model, "scan_model expects the float model (plain nn.Conv/nn.Linear layers) and builds the deployer's "
        "quantized twins itself"
    )
    settings = scan_settings(
        bit_widths=bit_widths, quantizer=quantizer, act_bit_width=act_bit_width, seed=seed, max_samples=max_samples,
        calibrate_batches=calibrate_batches, trigger_samples=trigger_samples, trigger_steps=trigger_steps,
        trigger_lr=trigger_lr, trigger_cost=trigger_cost, strip_overlays=strip_overlays, thresholds=thresholds,
    )
    bits_list, config, limits = settings.bit_widths, settings.config, settings.thresholds
    start = time.perf_counter()
    # normal tensors, even inside Lightning's evaluation loops; a DataLoader draws its seed from the global RNG
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        x, y = _collect(dataloader, adapter_or_default(batch_adapter), max_samples)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x.to(device), y.to(device)

    bar = tqdm(total=(1 + len(bits_list)) * trigger_steps + len(bits_list), desc="scan_model", disable=not progress,
               leave=False)
    evidence: dict[int, dict[str, float]] = {}
    suspects: dict[int, int] = {}
    try:
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            float_logits = logits_of(model, x)
            if float_logits.ndim != 2 or len(float_logits) != len(y):
                raise ValueError(f"model must return logits of shape (N, C), got {tuple(float_logits.shape)}")
            num_classes = float_logits.shape[1]
            if int(y.max()) >= num_classes or int(y.min()) < 0:
                raise ValueError(
                    f"dataloader labels must be class indices of the model's {num_classes} outputs, "
                    f"got labels in [{int(y.min())}, {int(y.max())}]"
                )
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randperm(len(y), generator=generator)[:trigger_samples].to(device)
            x_t, y_t = x[rows], y[rows]
            low, high = float(x.min()), float(x.max())

            def search(net: nn.Module) -> Any:
                return reverse_engineer_triggers(
                    net, x_t, y_t, num_classes=num_classes, steps=trigger_steps, lr=trigger_lr, cost=trigger_cost,
                    low=low, high=high, generator=torch.Generator().manual_seed(seed + 1), on_step=bar.update,
                )

            bar.set_description("scan_model: float triggers")
            float_triggers = search(model)
            float_correct = float((float_logits.argmax(1) == y).double().mean())
            for bits in bits_list:
                bar.set_description(f"scan_model: {bits}-bit twin")
                twin = _twin(model, x, y, config, bits, calibrate_batches)
                bar.update()
                if on_twin is not None:
                    on_twin(bits, twin)
                quant_logits = logits_of(twin, x)
                values = prediction_evidence(float_logits, quant_logits, num_classes)
                values.update(truncation_evidence(twin))
                bar.set_description(f"scan_model: {bits}-bit triggers")
                quant_triggers = search(twin)
                ratios = (float_triggers.norms.clamp_min(1e-3) / quant_triggers.norms.clamp_min(1e-3)).log()
                shrunk = int(ratios.argmax())
                values["trigger_ratio"] = float(ratios[shrunk])
                values["trigger_anomaly"], smallest = anomaly_index(quant_triggers.norms)
                strip_float = strip_entropy(model, float_triggers.stamp(x_t, shrunk), x, overlays=strip_overlays,
                                            generator=torch.Generator().manual_seed(seed + 2))
                strip_quant = strip_entropy(twin, quant_triggers.stamp(x_t, shrunk), x, overlays=strip_overlays,
                                            generator=torch.Generator().manual_seed(seed + 2))
                values["strip_drop"] = strip_float - strip_quant
                values["trigger_norm_float"] = float(float_triggers.norms[shrunk])
                values["trigger_norm_quantized"] = float(quant_triggers.norms[shrunk])
                values["trigger_success_quantized"] = float(quant_triggers.success[shrunk])
                values["float_accuracy"] = float_correct
                values["quantized_accuracy"] = float((quant_logits.argmax(1) == y).double().mean())
                evidence[bits] = values
                # the likeliest target: that of the trigger evidence further above (or nearer to) its threshold
                by_anomaly = values["trigger_anomaly"] / limits[bits]["trigger_anomaly"] > values[
                    "trigger_ratio"] / limits[bits]["trigger_ratio"]
                suspects[bits] = smallest if by_anomaly else shrunk
                del twin
    finally:
        bar.close()
    ratios_per_bits = {b: {e: evidence[b][e] / limits[b][e] for e in EVIDENCE} for b in bits_list}
    flagged = [f"{b}/{e}" for b in bits_list for e in EVIDENCE if ratios_per_bits[b][e] > 1.0]
    score = max(max(r.values()) for r in ratios_per_bits.values())
    # the target is read off the triggers, so it comes from the bit width whose trigger evidence is strongest
    trigger_bits = max(bits_list, key=lambda b: max(ratios_per_bits[b]["trigger_ratio"],
                                                    ratios_per_bits[b]["trigger_anomaly"]))
    return ScanResult(
        suspicious=score > 1.0,
        score=float(score),
        threshold=1.0,
        evidence=evidence,
        thresholds=limits,
        suspect_classes=suspects,
        target_class=suspects[trigger_bits],
        flagged=flagged,
        quantizer=config.to_dict() | {"weight_bit_width": None},
        samples=len(y),
        seconds=time.perf_counter() - start,
    )
