"""Evaluate the float model and every precision in place, at validation and test."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_qsec._eval import eval_mode
from lightning_qsec._validation import check_positive_int
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.callbacks._evaluation_hook import EvaluationCallback, Stage
from lightning_qsec.callbacks._target import quantized_target
from lightning_qsec.metrics import QuantizationDisagreement
from lightning_qsec.quant.precision import float_mode
from lightning_qsec.quant.spec import Precision, PrecisionLike, parse_precisions
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["PrecisionSweep"]


class PrecisionSweep(EvaluationCallback):
    """Accuracy of the float model and of each precision, their drop and disagreement.

    At the end of validation (every ``every_n_epochs`` epochs, never in the sanity
    check) and at test, each evaluation batch is also run through the float model
    (quantization switched off with :func:`~lightning_qsec.quant.float_mode`) and
    through the model at every precision (bit widths changed in place with
    :func:`~lightning_qsec.quant.at_precision`). Nothing is copied: the model is in
    eval mode, so neither Brevitas activation statistics nor BatchNorm statistics
    move, and train/eval flags are restored. A model that was never quantized gets a
    post-training-quantized twin instead, calibrated on ``calibrate_batches``
    training batches. Metrics are torchmetrics states, exact under DDP.

    Logged under ``qsec/`` (``qsec/float/acc``, ``qsec/w4a4/acc``, ``qsec/w4a4/drop``,
    ``qsec/w4a4/disagreement``), kept in :attr:`results` (latest per stage) and
    :attr:`history`, and written by :class:`~lightning_qsec.callbacks.SecurityReport`.

    With ``onnx=True`` each precision is also exported to QCDQ ONNX and run in
    onnxruntime on up to ``onnx_max_samples`` evaluation samples (rank zero's), once
    with graph optimizations disabled and once with onnxruntime's default (all): the
    deployed artifact is what must be judged.

    Args:
        bit_widths: precisions: ints (same weight and activation bits), ``(w, a)``
            pairs or strings like ``"w4a8"``.
        every_n_epochs: sweep at validation every this many epochs.
        max_batches: evaluation batches per sweep (``None``: all).
        calibrate_batches: training batches to calibrate a PTQ twin of a float model.
        onnx: also measure the exported model in onnxruntime.
        onnx_max_samples: evaluation samples kept for the onnxruntime check.
        batch_adapter: reads batches; default :func:`~lightning_qsec.read_batch`.

    Example:
        >>> from lightning_qsec.callbacks import PrecisionSweep
        >>> sweep = PrecisionSweep(bit_widths=[8, 4, "w4a8", 2])
        >>> [p.label for p in sweep.precisions]
        ['w8a8', 'w4a4', 'w4a8', 'w2a2']
    """

    def __init__(
        self,
        bit_widths: Sequence[PrecisionLike] = (8, 4, 2),
        *,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        calibrate_batches: int = 10,
        onnx: bool = False,
        onnx_max_samples: int = 512,
        batch_adapter: BatchAdapter | None = None,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs)
        self.precisions: list[Precision] = parse_precisions(bit_widths, "bit_widths")
        self.max_batches = None if max_batches is None else check_positive_int(max_batches, "max_batches")
        self.calibrate_batches = check_positive_int(calibrate_batches, "calibrate_batches")
        self.onnx = bool(onnx)
        self.onnx_max_samples = check_positive_int(onnx_max_samples, "onnx_max_samples")
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self._batch_adapter = batch_adapter
        self._target: nn.Module | None = None
        self._is_twin = False
        self._metrics: dict[str, nn.Module] = {}
        self._samples: list[tuple[Tensor, Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bit_widths=[p.label for p in self.precisions])

    # ------------------------------------------------------------------ lifecycle
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._target, self._is_twin = quantized_target(
            trainer, pl_module, calibrate_batches=self.calibrate_batches, batch_adapter=self._batch_adapter
        )
        self._metrics = {}
        self._samples = []

    def _metric(self, key: str, num_classes: int, device: torch.device) -> nn.Module:
        if key not in self._metrics:
            metric = (
                QuantizationDisagreement()
                if key.endswith("/disagreement")
                else MulticlassAccuracy(num_classes=num_classes, average="micro")
            )
            self._metrics[key] = metric.to(device)
        return self._metrics[key]

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        assert self._target is not None
        b = self._read(batch)
        x, y = b.inputs.to(pl_module.device), b.targets.to(pl_module.device)
        model = self._target
        with eval_mode(model), torch.no_grad():
            with float_mode(model):
                float_logits = model(x)
            num_classes = float_logits.shape[1]
            float_preds = float_logits.argmax(1)
            self._metric("float/acc", num_classes, x.device).update(float_preds, y)
            for p in self.precisions:
                with self.precision(model, p):
                    preds = model(x).argmax(1)
                self._metric(f"{p.label}/acc", num_classes, x.device).update(preds, y)
                self._metric(f"{p.label}/disagreement", num_classes, x.device).update(float_preds, preds)
        if self.onnx:
            kept = sum(len(s[0]) for s in self._samples)
            if kept < self.onnx_max_samples:
                take = self.onnx_max_samples - kept
                self._samples.append((x[:take].detach().cpu().clone(), y[:take].detach().cpu().clone()))

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        if not self._metrics:
            raise ValueError(f"PrecisionSweep saw no {stage} batches: the evaluation dataloader is empty")
        values = {key: float(metric.compute()) for key, metric in self._metrics.items()}
        float_acc = values["float/acc"]
        result: dict[str, Any] = {
            "stage": stage,
            "epoch": self.epoch(trainer),
            "global_step": int(trainer.global_step),
            "ptq_twin": self._is_twin,
            "float": {"accuracy": float_acc},
            "precisions": {},
        }
        for p in self.precisions:
            acc = values[f"{p.label}/acc"]
            result["precisions"][p.label] = {
                "weight_bit_width": p.weight_bit_width,
                "act_bit_width": p.act_bit_width,
                "accuracy": acc,
                "drop": float_acc - acc,
                "disagreement": values[f"{p.label}/disagreement"],
            }
        if self.onnx and trainer.is_global_zero:
            result["onnx"] = self._measure_onnx()
        for key, metric in self._metrics.items():
            metric.reset()
        logs = {"qsec/float/acc": float_acc}
        for label, r in result["precisions"].items():
            logs.update({f"qsec/{label}/acc": r["accuracy"], f"qsec/{label}/drop": r["drop"],
                         f"qsec/{label}/disagreement": r["disagreement"]})
        for name, value in logs.items():
            pl_module.log(name, value, sync_dist=True)  # equal on every rank already
        self._target, self._metrics, self._samples = None, {}, []
        return result

    def _measure_onnx(self) -> dict[str, Any]:
        from lightning_qsec.quant.export import compare_deployed, export_onnx  # the [export] extra

        assert self._target is not None
        x = torch.cat([s[0] for s in self._samples])
        y = torch.cat([s[1] for s in self._samples])
        device = next(self._target.parameters()).device
        out: dict[str, Any] = {"samples": int(len(x)), "format": "qcdq", "precisions": {}}
        with torch.inference_mode(False), tempfile.TemporaryDirectory() as tmp:
            for p in self.precisions:
                path = Path(tmp) / f"{p.label}.onnx"
                with self.precision(self._target, p):
                    export_onnx(self._target, path, example_input=x[:2].clone().to(device), format="qcdq")
                    out["precisions"][p.label] = {
                        level: compare_deployed(self._target, path, x.clone(), y.clone(), graph_optimization=level)
                        for level in ("disabled", "all")
                    }
        return out

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection | None:
        if not self.results:
            return None
        tables, plots, notes = [], [], []
        line_series: dict[str, list[tuple[Any, float]]] = {}
        hlines: dict[str, float] = {}
        for stage, r in self.results.items():
            rows = [["float", "-", "-", r["float"]["accuracy"], 0.0, 0.0]]
            rows += [
                [label, v["weight_bit_width"], v["act_bit_width"], v["accuracy"], v["drop"], v["disagreement"]]
                for label, v in r["precisions"].items()
            ]
            tables.append(Table(
                title=f"{stage} (epoch {r['epoch']}{', post-training quantized twin' if r['ptq_twin'] else ''})",
                columns=["precision", "weight bits", "act bits", "accuracy", "drop from float", "disagreement"],
                rows=rows,
            ))
            line_series[f"{stage} quantized"] = [(label, v["accuracy"]) for label, v in r["precisions"].items()]
            hlines[f"{stage} float"] = r["float"]["accuracy"]
            if "onnx" in r:
                onnx_rows = []
                for label, levels in r["onnx"]["precisions"].items():
                    for level, m in levels.items():
                        onnx_rows.append([label, level, m.get("simulation_accuracy"), m.get("runtime_accuracy"),
                                          m.get("prediction_flip_rate"), m.get("max_abs_logit_diff")])
                tables.append(Table(
                    title=f"{stage}: Brevitas simulation vs onnxruntime ({r['onnx']['samples']} samples)",
                    columns=["precision", "graph optimization", "simulation acc", "onnxruntime acc",
                             "predictions flipped", "max |logit diff|"],
                    rows=onnx_rows,
                ))
                onnx_note = "onnxruntime settings are recorded per precision in report.json; judge the deployed runtime."
                if onnx_note not in notes:
                    notes.append(onnx_note)
        latest = self.results.get("test") or self.results.get("validate") or {}
        plots.append(Plot(
            filename="accuracy_vs_bit_width.png", title="Accuracy vs bit width", xlabel="precision",
            ylabel="accuracy", series=line_series, kind="line", hlines=hlines,
        ))
        if latest:
            labels = list(latest["precisions"])
            plots.append(Plot(
                filename="float_vs_quantized.png", title=f"Float vs quantized ({latest['stage']})",
                xlabel="precision", ylabel="fraction",
                series={
                    "float accuracy": [(label, latest["float"]["accuracy"]) for label in labels],
                    "quantized accuracy": [(label, latest["precisions"][label]["accuracy"]) for label in labels],
                    "disagreement": [(label, latest["precisions"][label]["disagreement"]) for label in labels],
                },
                kind="bar",
            ))
        return ReportSection(
            name="precision_sweep", title="Precision sweep", data={"latest": self.results, "history": self.history},
            tables=tables, plots=plots, notes=notes,
        )
