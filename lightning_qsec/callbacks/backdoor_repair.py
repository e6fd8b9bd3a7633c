"""Callback form of :func:`~lightning_qsec.defenses.repair_quantization_backdoor`."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from lightning_qsec.callbacks._target import single_loader
from lightning_qsec.defenses.repair import RepairMethod, RepairReport, repair_quantization_backdoor, repair_settings
from lightning_qsec.quant.weight_grid import WeightQuantizer
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["QuantizationBackdoorRepair"]


class QuantizationBackdoorRepair(pl.Callback):
    """Repair a quantization-conditioned backdoor in the LightningModule before it is deployed.

    **When it runs.** At ``on_fit_end`` of every ``fit`` (so the module you fine-tuned is
    repaired before you test, export or save it; a fit resumed from a checkpoint is
    repaired again at its end), or, when a Trainer's first stage is a standalone
    ``trainer.validate()``/``trainer.test()`` (the case of a float model downloaded from a
    hub), once, at the start of that loop, after any ``ckpt_path`` restore, so the loop
    measures the repaired model. The module must be float (plain ``nn.Conv``/``nn.Linear``
    layers): do not combine it with ``QuantizationAwareTraining``. Single process only:
    ``setup`` refuses more than one process. Unknown or bad settings are refused when
    the callback is built.

    **What it changes.** The module's own float weights are overwritten with the
    repaired ``float_model`` of :func:`~lightning_qsec.defenses.repair_quantization_backdoor`:
    deploying the module at ``bit_width`` with ``quantizer`` (``quantize_model`` +
    ``calibrate``) then gives the repaired integers. The module stays float; the deployed
    quantized model is :attr:`result` ``.model``. Calibration batches come from
    ``dataloader`` or the trainer's training data; the report is measured on
    ``eval_dataloader`` or the datamodule's validation data (else the calibration batches).

    Args:
        bit_width: the deployer's weight bit width, 2..16.
        method: ``"flip_rounding"`` (EFRAP), ``"activation_alignment"`` (LAC-style) or
            ``"finetune"`` (QAT baseline).
        quantizer: the deployer's weight quantizer, ``"per_tensor"`` or ``"per_channel"``.
        act_bit_width: the deployer's activation bit width, 2..16.
        dataloader: clean calibration batches; default the training loader.
        eval_dataloader: labelled batches for the before/after report.
        trigger: trigger for the attack success rate (a patch tensor or a callable); with ``target_class``.
        target_class: the backdoor's target class.
        **repair_kwargs: passed on (``num_batches``, ``steps``, ``lr``, ``seed``, ...).

    Attributes:
        result: the :class:`~lightning_qsec.defenses.RepairResult` of this process (not checkpointed).
        report: the :class:`~lightning_qsec.defenses.RepairReport` (kept in ``state_dict``; one
            restored from a checkpoint is only shown until this callback repairs again).

    Example:
        >>> from lightning_qsec.callbacks import QuantizationBackdoorRepair
        >>> repair = QuantizationBackdoorRepair(bit_width=4, method="flip_rounding")
    """

    def __init__(
        self,
        *,
        bit_width: int = 4,
        method: RepairMethod = "flip_rounding",
        quantizer: WeightQuantizer = "per_tensor",
        act_bit_width: int = 8,
        dataloader: Iterable[Any] | None = None,
        eval_dataloader: Iterable[Any] | None = None,
        trigger: Tensor | Callable[[Tensor], Tensor] | None = None,
        target_class: int | None = None,
        **repair_kwargs: Any,
    ) -> None:
        super().__init__()
        for forbidden in ("model", "calibration_loader", "eval_loader"):
            if forbidden in repair_kwargs:
                raise ValueError(
                    f"QuantizationBackdoorRepair sets {forbidden!r} itself; pass dataloader=/eval_dataloader="
                )
        named = set(inspect.signature(QuantizationBackdoorRepair.__init__).parameters)
        allowed = sorted(set(inspect.signature(repair_quantization_backdoor).parameters) - named
                         - {"model", "calibration_loader", "eval_loader"})
        unknown = sorted(set(repair_kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"unknown repair_quantization_backdoor settings {unknown}; allowed: {allowed}")
        # every setting is checked now, by repair_quantization_backdoor's own checks, not after training
        settings = repair_settings(
            bit_width=bit_width, method=method, quantizer=quantizer, act_bit_width=act_bit_width, trigger=trigger,
            target_class=target_class, **{k: v for k, v in repair_kwargs.items() if k != "batch_adapter"},
        )
        self.bit_width = settings.bit_width
        self.act_bit_width = settings.act_bit_width
        self.quantizer = settings.quantizer
        self.method = settings.method
        self.dataloader = dataloader
        self.eval_dataloader = eval_dataloader
        self.trigger = trigger
        self.target_class = target_class
        self.repair_kwargs = repair_kwargs
        self.result: Any = None
        self.report: RepairReport | None = None
        self._repaired = False  # by this callback, in the current fit or standalone evaluation
        self._trainer: weakref.ref[pl.Trainer] | None = None

    def _loaders(self, trainer: pl.Trainer) -> tuple[Iterable[Any], Iterable[Any] | None]:
        calibration = self.dataloader
        dm = trainer.datamodule
        if calibration is None:
            calibration = single_loader(trainer.train_dataloader) if trainer.state.fn == TrainerFn.FITTING else None
            if calibration is None and dm is not None:
                calibration = single_loader(dm.train_dataloader())
        if calibration is None:
            raise ValueError("QuantizationBackdoorRepair found no calibration data; pass dataloader=")
        evaluation = self.eval_dataloader
        if evaluation is None and dm is not None:
            try:
                evaluation = single_loader(dm.val_dataloader())
            except (NotImplementedError, AttributeError):  # a datamodule without validation data
                evaluation = None
        return calibration, evaluation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("QuantizationBackdoorRepair runs in a single process; use devices=1")
        # a fit (a resumed one too) trains weights not repaired yet, and so may another Trainer's module
        if stage == TrainerFn.FITTING.value or self._trainer is None or self._trainer() is not trainer:
            self._repaired = False
        self._trainer = weakref.ref(trainer)

    def _repair(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._repaired:
            return
        calibration, evaluation = self._loaders(trainer)
        with torch.inference_mode(False):
            result = repair_quantization_backdoor(
                pl_module, calibration, bit_width=self.bit_width, method=self.method, quantizer=self.quantizer,
                act_bit_width=self.act_bit_width, eval_loader=evaluation, trigger=self.trigger,
                target_class=self.target_class, **self.repair_kwargs,
            )
            with torch.no_grad():
                pl_module.load_state_dict(result.float_model.state_dict())
        self.result, self.report = result, result.report
        self._repaired = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._repair(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._repair(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._repair(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"report": None if self.report is None else self.report.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        report = state_dict.get("report")
        self.report = None if report is None else RepairReport(**report)

    def report_section(self) -> ReportSection | None:
        """Before/after clean accuracy, ASR and agreement with float, for the security report."""
        if self.report is None:
            return None
        r = self.report
        rows = [
            ["float (as published)", r.clean_acc_float, r.asr_float, 1.0],
            [f"w{r.bit_width} {r.quantizer}, nearest rounding", r.clean_acc_before, r.asr_before, r.agreement_before],
            [f"w{r.bit_width} {r.quantizer}, repaired", r.clean_acc_after, r.asr_after, r.agreement_after],
        ]
        series: dict[str, list[tuple[Any, float]]] = {
            "clean accuracy": [
                ("float", r.clean_acc_float), ("before", r.clean_acc_before), ("after", r.clean_acc_after)
            ]
        }
        if r.asr_before is not None and r.asr_after is not None and r.asr_float is not None:
            series["attack success rate"] = [("float", r.asr_float), ("before", r.asr_before), ("after", r.asr_after)]
        notes = [
            f"method {r.method}; deployment: weights {r.bit_width} bits ({r.quantizer}), activations "
            f"{r.act_bit_width} bits; {r.eval_samples} evaluation samples; {100 * r.changed_weights:.1f} % of "
            f"weights rounded differently from nearest; {r.seconds:.1f} s",
        ]
        if r.der is not None:
            notes.append(f"defense effectiveness rate (BackdoorBench): {r.der:.3f}")
        else:
            notes.append("no trigger given: attack success rate not measured")
        return ReportSection(
            name="backdoor_repair",
            title="Quantization-backdoor repair",
            data=r.to_dict(),
            tables=[Table("Before and after repair", ["model", "clean accuracy", "ASR", "agreement with float"], rows)],
            plots=[Plot("backdoor_repair.png", "Quantization-backdoor repair", "model", "rate", series, kind="bar")],
            notes=notes,
        )
