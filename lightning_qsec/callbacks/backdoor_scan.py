"""The :class:`BackdoorScan` evaluation hook: scan the float module for quantization-conditioned backdoors.

With a known trigger and target class the hook also measures, BackdoorBench-style (Wu et
al., NeurIPS 2022 Datasets and Benchmarks, https://arxiv.org/abs/2206.12654), the clean
accuracy and the attack success rate at float and on each quantized twin the scan builds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_qsec._validation import check_positive_int
from lightning_qsec.attacks.poisoning import Trigger, trigger_function
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.callbacks._evaluation_hook import EvaluationCallback, Stage
from lightning_qsec.defenses._scan_evidence import logits_of
from lightning_qsec.defenses._scan_settings import scan_settings
from lightning_qsec.defenses.backdoor_scan import EVIDENCE, Quantizer, ScanResult, scan_model
from lightning_qsec.metrics.attack_success_rate import AttackSuccessRate
from lightning_qsec.metrics.backdoor import CleanAccuracy
from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["BackdoorScan"]


def _backdoor_rates(
    model: nn.Module, x: Tensor, y: Tensor, stamp: Callable[[Tensor], Tensor], target_class: int
) -> dict[str, float]:
    """BackdoorBench's clean accuracy and attack success rate of ``model`` on ``x`` and ``stamp(x)``."""
    clean, triggered = logits_of(model, x), logits_of(model, stamp(x))
    accuracy, asr = CleanAccuracy(), AttackSuccessRate(targeted=True)
    accuracy.update(clean.cpu(), y)
    asr.update(clean.cpu(), triggered.cpu(), y, attack_target=target_class)
    return {"clean_accuracy": float(accuracy.compute()), "attack_success_rate": float(asr.compute())}


def _label(precision: str) -> str:
    return precision if precision == "float" else f"w{precision}"


class BackdoorScan(EvaluationCallback):
    """Scan the float LightningModule for a backdoor that wakes up once it is quantized.

    At the end of each stage in ``stages`` (``trainer.test`` by default) the hook runs
    :func:`~lightning_qsec.defenses.scan_model` on the module, with the first
    ``max_samples`` samples of the stage's dataloader as the clean data and the
    deployer's ``quantizer`` settings at every bit width in ``bit_widths``. Use it before
    deploying a float model someone else trained (e.g. downloaded from a hub): load it
    into your LightningModule and call ``trainer.test`` on your own clean data. The
    module's ``forward`` must map inputs to logits ``(N, C)``. The module is never
    changed: the scan quantizes deep copies, and runs everything in eval mode. A module
    that is already quantized (e.g. trained with
    :class:`~lightning_qsec.callbacks.QuantizationAwareTraining`) is refused: the scan
    is for float models before deployment. Under DDP the samples every process collected
    from its shard are gathered in rank order, so all processes scan the same samples (the
    first ``max_samples`` of them) and hold the same result.

    Results go to :attr:`results` (latest per stage; :meth:`ScanResult.to_dict` plus
    ``stage`` and ``epoch``), :attr:`history` and :attr:`scan` (the last
    :class:`~lightning_qsec.defenses.ScanResult`); ``qsec/backdoor_scan/score`` and
    ``qsec/backdoor_scan/suspicious`` are logged; :class:`~lightning_qsec.callbacks.SecurityReport`
    writes a table of the evidence per bit width and a bar plot of each evidence
    relative to its threshold.

    **Known backdoor.** With ``target_class`` (and optionally ``trigger``), e.g. to check
    a red-team model or a repair, the hook also measures on the same clean samples it
    scans, at float and on each quantized twin the scan builds (the same deployer twins,
    handed over by ``scan_model``'s ``on_twin``, not built again), BackdoorBench's clean
    accuracy (:class:`~lightning_qsec.metrics.CleanAccuracy`) and attack success rate
    (:class:`~lightning_qsec.metrics.AttackSuccessRate` with ``targeted=True``: triggered
    samples outside the target class that land in it). They go to the result's
    ``"backdoor"`` entry (``target_class`` and ``precisions``: ``"float"``, ``"8"``,
    ``"4"``, ... -> ``clean_accuracy``, ``attack_success_rate``), are logged as
    ``qsec/backdoor_scan/asr/<precision>``, and the report adds a bar plot of the
    attack success rate per precision and a table of both per precision.

    Args:
        bit_widths: weight bit widths the deployer may use, each 2..16.
        quantizer: ``"per_tensor"``, ``"per_channel"`` or a :class:`~lightning_qsec.QuantConfig`.
        act_bit_width: activation bit width with a string ``quantizer`` (default 8).
        seed: seed of the scan.
        max_samples: clean samples to collect from the evaluation batches.
        progress: show the scan's progress bar.
        thresholds: bit width -> evidence -> threshold, overriding the calibrated ones;
            integer keys among ``bit_widths``, thresholds finite and > 0.
        batch_adapter: reads batches; default :func:`~lightning_qsec.read_batch`.
        stages: ``"test"`` and/or ``"validate"``.
        every_n_epochs: scan at validation during fit every this many epochs.
        target_class: the known backdoor's target class: also measure clean accuracy
            and attack success per precision. ``None``: scan only.
        trigger: the known backdoor's trigger, as in
            :func:`~lightning_qsec.attacks.trigger_function`: ``None`` (BadNets' 2x2
            white patch, bottom right), a patch tensor ``(h, w)``/``(C, h, w)`` or a
            callable stamping a batch. Only with ``target_class``.
        **scan_kwargs: further settings of :func:`~lightning_qsec.defenses.scan_model`
            (``trigger_steps``, ``trigger_samples``, ``calibrate_batches``, ...).

    Example:
        >>> from lightning_qsec.callbacks import BackdoorScan
        >>> scan = BackdoorScan(bit_widths=[8, 4], quantizer="per_channel")
        >>> scan.bit_widths, scan.stages
        ([8, 4], ['test'])
        >>> BackdoorScan(target_class=0).target_class  # also ASR of the 2x2 white patch per precision
        0
    """

    empty_stage_meaning = "no clean samples to scan with"

    def __init__(
        self,
        bit_widths: Sequence[int] = (8, 4),
        *,
        quantizer: QuantConfig | Quantizer = "per_tensor",
        act_bit_width: int | None = None,
        seed: int = 0,
        max_samples: int = 512,
        progress: bool = False,
        thresholds: Mapping[int, Mapping[str, float]] | None = None,
        batch_adapter: BatchAdapter | None = None,
        stages: Sequence[Stage] = ("test",),
        every_n_epochs: int = 1,
        target_class: int | None = None,
        trigger: Trigger = None,
        **scan_kwargs: Any,
    ) -> None:
        for forbidden in ("model", "dataloader", "on_twin"):
            if forbidden in scan_kwargs:
                raise ValueError(f"BackdoorScan sets {forbidden!r} itself; do not pass it")
        allowed = set(inspect.signature(scan_settings).parameters)
        unknown = sorted(set(scan_kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown scan_model settings {unknown}; allowed: {sorted(allowed)}")
        super().__init__(every_n_epochs=every_n_epochs, stages=(stages,) if isinstance(stages, str) else stages)
        self.max_samples = check_positive_int(max_samples, "max_samples")
        self.scan_kwargs: dict[str, Any] = dict(
            bit_widths=list(bit_widths) if not isinstance(bit_widths, (str, bytes)) else bit_widths,
            quantizer=quantizer, act_bit_width=act_bit_width, seed=seed, progress=progress,
            thresholds=thresholds, max_samples=self.max_samples, **scan_kwargs,
        )
        # every setting is checked now, by scan_model's own checks, not later inside the trainer
        settings = scan_settings(**{k: v for k, v in self.scan_kwargs.items() if k != "progress"})
        self.bit_widths: list[int] = settings.bit_widths
        if target_class is not None and (
            isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0
        ):
            raise ValueError(f"target_class must be None or a non-negative integer class index, got {target_class!r}")
        if target_class is None and trigger is not None:
            raise ValueError("trigger is only used with target_class: pass target_class= to measure its success rate")
        self.target_class = target_class
        self._stamp = trigger_function(trigger)
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self.scan: ScanResult | None = None
        self._inputs: list[Tensor] = []
        self._targets: list[Tensor] = []

    @property
    def state_key(self) -> str:
        # every setting that tells two hooks of one Trainer apart, so that each restores its own state
        return self._generate_state_key(
            bit_widths=self.scan_kwargs["bit_widths"], quantizer=str(self.scan_kwargs["quantizer"]),
            act_bit_width=self.scan_kwargs["act_bit_width"], stages=self.stages,
        )

    # ------------------------------------------------------------------ lifecycle
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_quantized(pl_module):
            raise ValueError(
                "BackdoorScan scans a float model before deployment, but the LightningModule is already quantized "
                "(QuantizationAwareTraining?); scan the float model (e.g. a fresh module with the float checkpoint)"
            )
        self._inputs, self._targets = [], []

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        have = sum(len(t) for t in self._targets)
        if have >= self.max_samples:
            return
        b = self._read(batch)
        self._inputs.append(b.inputs[: self.max_samples - have].detach().cpu())
        self._targets.append(b.targets[: self.max_samples - have].detach().cpu())

    def _gathered(self, trainer: pl.Trainer) -> list[tuple[Tensor, Tensor]]:
        """The collected samples as batches; under DDP every rank's, in rank order, on every rank."""
        inputs, targets = self._inputs, self._targets
        self._inputs, self._targets = [], []
        if trainer.world_size == 1 or not inputs:
            return list(zip(inputs, targets))
        strategy = trainer.strategy
        x = torch.cat(inputs).to(strategy.root_device)
        y = torch.cat(targets).to(strategy.root_device)
        counts = strategy.all_gather(torch.tensor(len(y), device=strategy.root_device)).flatten().tolist()
        pad = max(counts) - len(y)  # all_gather needs equal shapes
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        y = torch.cat([y, y.new_zeros(pad)])
        xs, ys = strategy.all_gather(x).cpu(), strategy.all_gather(y).cpu()
        return [(xs[rank, :n], ys[rank, :n]) for rank, n in enumerate(counts) if n]

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        batches = self._gathered(trainer)
        precisions: dict[str, dict[str, float]] = {}
        measure = None
        if self.target_class is not None:
            measure = self._backdoor_probe(pl_module, batches, self.target_class, precisions)
        self.scan = scan_model(pl_module, batches, on_twin=measure, **self.scan_kwargs)
        pl_module.log("qsec/backdoor_scan/score", self.scan.score)
        pl_module.log("qsec/backdoor_scan/suspicious", float(self.scan.suspicious))
        result = {"stage": stage, "epoch": self.epoch(trainer), **self.scan.to_dict()}
        if precisions:
            for precision, rates in precisions.items():
                pl_module.log(f"qsec/backdoor_scan/asr/{precision}", rates["attack_success_rate"])
            result["backdoor"] = {"target_class": self.target_class, "precisions": precisions}
        return result

    def _backdoor_probe(
        self, pl_module: pl.LightningModule, batches: list[tuple[Tensor, Tensor]], target_class: int,
        precisions: dict[str, dict[str, float]],
    ) -> Callable[[int, nn.Module], None]:
        """Measure the known backdoor at float into ``precisions``; return the probe of each scanned twin."""
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        with torch.inference_mode(False):  # normal tensors, even inside Lightning's evaluation loops
            x = torch.cat([b[0] for b in batches]).to(device).clone()
            y = torch.cat([b[1] for b in batches]).long().clone()
            num_classes = logits_of(pl_module, x[:1]).shape[-1]
            if target_class >= num_classes:
                raise ValueError(
                    f"target_class must be a class of the model's {num_classes} outputs (0..{num_classes - 1}), "
                    f"got {target_class}"
                )
            precisions["float"] = _backdoor_rates(pl_module, x, y, self._stamp, target_class)

        def probe(bits: int, twin: nn.Module) -> None:
            precisions[str(bits)] = _backdoor_rates(twin, x, y, self._stamp, target_class)

        return probe

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection | None:
        if not self.results:
            return None
        tables: list[Table] = []
        for stage, r in self.results.items():
            verdict = "SUSPICIOUS" if r["suspicious"] else "no evidence over threshold"
            rows = []
            for bits, values in r["evidence"].items():
                limits = r["thresholds"][bits]
                rows.append([f"w{bits}", *[f"{values[e]:.3f} / {limits[e]:.3f}" for e in EVIDENCE],
                             values["float_accuracy"], values["quantized_accuracy"], r["suspect_classes"][bits]])
            tables.append(Table(
                title=(f"Backdoor scan ({stage}, epoch {r['epoch']}, {r['samples']} clean samples): {verdict}, "
                       f"score {r['score']:.2f} (threshold {r['threshold']:.2f}); value / threshold"),
                columns=["weight bits", *EVIDENCE, "float accuracy", "quantized accuracy", "suspect class"],
                rows=rows,
            ))
            if "backdoor" in r:
                known = r["backdoor"]
                tables.append(Table(
                    title=(f"Known backdoor ({stage}, target class {known['target_class']}): BackdoorBench clean "
                           "accuracy and attack success rate per precision, on the scanned samples"),
                    columns=["precision", "clean accuracy", "attack success rate"],
                    rows=[[_label(p), v["clean_accuracy"], v["attack_success_rate"]]
                          for p, v in known["precisions"].items()],
                ))
        latest = self.results.get("test") or self.results.get("validate") or {}
        plots = [Plot(
            filename="backdoor_scan_evidence.png",
            title=f"Backdoor scan evidence relative to its threshold ({latest['stage']})",
            xlabel="evidence", ylabel="value / calibrated threshold (> 1: suspicious)",
            series={f"w{bits}": [(e, values[e] / latest["thresholds"][bits][e]) for e in EVIDENCE]
                    for bits, values in latest["evidence"].items()},
            kind="bar", hlines={"threshold": 1.0},
        )]
        if "backdoor" in latest:
            known = latest["backdoor"]
            plots.append(Plot(
                filename="backdoor_scan_asr.png",
                title=f"Attack success rate per precision, target class {known['target_class']} ({latest['stage']})",
                xlabel="precision", ylabel="rate",
                series={name: [(_label(p), v[key]) for p, v in known["precisions"].items()]
                        for name, key in (("attack success rate", "attack_success_rate"),
                                          ("clean accuracy", "clean_accuracy"))},
                kind="bar",
            ))
        notes = [
            "scan_model compares the float model with the deployer's quantized twin (quantize_model + calibrate "
            f"with {latest['quantizer']}) at each weight bit width: prediction disagreement and class shift on "
            "clean data, truncation-error outliers of the weights on the deployer's grid (EFRAP), Neural Cleanse "
            "trigger sizes through the quantized vs the float forward and Neural Cleanse's anomaly index of the "
            "quantized triggers, and STRIP entropy of the stamped inputs.",
            "Each evidence is divided by a threshold calibrated on clean models (benchmarks/backdoor_scan.py "
            "--calibrate); the model is suspicious when any ratio exceeds 1.",
        ]
        if "backdoor" in latest:
            notes.append(
                "Known backdoor: BackdoorBench's clean accuracy and attack success rate (triggered samples outside "
                "the target class that are classified as it) on the scanned samples, at float and on the very "
                "quantized twins the scan built."
            )
        return ReportSection(
            name="backdoor_scan", title="Quantization-conditioned backdoor scan",
            data={"latest": self.results, "history": self.history}, tables=tables, plots=plots, notes=notes,
        )
