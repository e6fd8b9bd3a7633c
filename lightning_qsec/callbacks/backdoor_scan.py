"""The :class:`BackdoorScan` evaluation hook: scan the float module for quantization-conditioned backdoors."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from lightning_qsec._validation import check_positive_int
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.callbacks._evaluation_hook import EvaluationCallback, Stage
from lightning_qsec.defenses._scan_settings import scan_settings
from lightning_qsec.defenses.backdoor_scan import EVIDENCE, Quantizer, ScanResult, scan_model
from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["BackdoorScan"]


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
    is for float models before deployment. Under DDP each process scans the samples of
    its own shard of the dataloader.

    Results go to :attr:`results` (latest per stage; :meth:`ScanResult.to_dict` plus
    ``stage`` and ``epoch``), :attr:`history` and :attr:`scan` (the last
    :class:`~lightning_qsec.defenses.ScanResult`); ``qsec/backdoor_scan/score`` and
    ``qsec/backdoor_scan/suspicious`` are logged; :class:`~lightning_qsec.callbacks.SecurityReport`
    writes a table of the evidence per bit width and a bar plot of each evidence
    relative to its threshold.

    Args:
        bit_widths: weight bit widths the deployer may use, each 2..16.
        quantizer: ``"per_tensor"``, ``"per_channel"`` or a :class:`~lightning_qsec.QuantConfig`.
        act_bit_width: activation bit width with a string ``quantizer`` (default 8).
        seed: seed of the scan.
        max_samples: clean samples to collect from the evaluation batches.
        progress: show the scan's progress bar.
        thresholds: bit width -> evidence -> threshold, overriding the calibrated ones.
        batch_adapter: reads batches; default :func:`~lightning_qsec.read_batch`.
        stages: ``"test"`` and/or ``"validate"``.
        every_n_epochs: scan at validation during fit every this many epochs.
        **scan_kwargs: further settings of :func:`~lightning_qsec.defenses.scan_model`
            (``trigger_steps``, ``trigger_samples``, ``calibrate_batches``, ...).

    Example:
        >>> from lightning_qsec.callbacks import BackdoorScan
        >>> scan = BackdoorScan(bit_widths=[8, 4], quantizer="per_channel")
        >>> scan.bit_widths, scan.stages
        ([8, 4], ['test'])
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
        **scan_kwargs: Any,
    ) -> None:
        for forbidden in ("model", "dataloader"):
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
        self._read = adapter_or_default(batch_adapter)
        self.scan: ScanResult | None = None
        self._inputs: list[Tensor] = []
        self._targets: list[Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bit_widths=self.scan_kwargs["bit_widths"])

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

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        batches = list(zip(self._inputs, self._targets))
        self._inputs, self._targets = [], []
        self.scan = scan_model(pl_module, batches, **self.scan_kwargs)
        pl_module.log("qsec/backdoor_scan/score", self.scan.score)
        pl_module.log("qsec/backdoor_scan/suspicious", float(self.scan.suspicious))
        return {"stage": stage, "epoch": int(trainer.current_epoch), **self.scan.to_dict()}

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
        latest = self.results.get("test") or self.results.get("validate") or {}
        plots = [Plot(
            filename="backdoor_scan_evidence.png",
            title=f"Backdoor scan evidence relative to its threshold ({latest['stage']})",
            xlabel="evidence", ylabel="value / calibrated threshold (> 1: suspicious)",
            series={f"w{bits}": [(e, values[e] / latest["thresholds"][bits][e]) for e in EVIDENCE]
                    for bits, values in latest["evidence"].items()},
            kind="bar", hlines={"threshold": 1.0},
        )]
        notes = [
            "scan_model compares the float model with the deployer's quantized twin (quantize_model + calibrate "
            f"with {latest['quantizer']}) at each weight bit width: prediction disagreement and class shift on "
            "clean data, truncation-error outliers of the weights on the deployer's grid (EFRAP), Neural Cleanse "
            "trigger sizes through the quantized vs the float forward and Neural Cleanse's anomaly index of the "
            "quantized triggers, and STRIP entropy of the stamped inputs.",
            "Each evidence is divided by a threshold calibrated on clean models (benchmarks/backdoor_scan.py "
            "--calibrate); the model is suspicious when any ratio exceeds 1.",
        ]
        return ReportSection(
            name="backdoor_scan", title="Quantization-conditioned backdoor scan",
            data={"latest": self.results, "history": self.history}, tables=tables, plots=plots, notes=notes,
        )
