"""Quantization-aware training of an unchanged LightningModule, by adding one callback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelPruning, StochasticWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_qsec._validation import check_positive_int
from lightning_qsec.batch import BatchAdapter
from lightning_qsec.callbacks._target import gathered_batches
from lightning_qsec.distributed import broadcast_from_rank_zero
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.checkpoint import FLOAT_PHASE_KEY
from lightning_qsec.quant.config import QuantConfig
from lightning_qsec.quant.convert import quantize_model
from lightning_qsec.quant.inspect import stat_scalers
from lightning_qsec.quant.precision import float_mode
from lightning_qsec.quant.statistics import load_statistics_state, statistics_state

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(pl.Callback):
    """Brevitas QAT: swap the module's float layers for quantized ones in ``setup``.

    The swap happens in ``setup()`` for every stage (fit, validate, test, predict), so
    it precedes ``configure_optimizers`` (the new parameters are trained), checkpoint
    restore (``fit(ckpt_path=...)`` and ``test(ckpt_path=...)`` load quantized weights)
    and DDP wrapping. It is idempotent and ``forward`` is never wrapped. Weights start
    from the module's float weights. With ``calibrate_batches > 0`` the activation
    scales are calibrated on that many training batches before the first step (under
    DDP on the batches of all ranks, so every rank gets the scales of a one-process run),
    with BatchNorm normalising by batch statistics as training will (``calibrate(...,
    batchnorm="batch")``); with 0 Brevitas gathers them over the first training steps.

    With ``float_epochs=N`` the first ``N`` epochs of ``fit`` train the model in float
    (every quantizer off, :func:`~lightning_qsec.quant.float_mode`; no activation
    statistics are gathered), then the scales are calibrated and QAT fine-tunes the
    trained float model: a quantization delay, in one ``fit``. Evaluation hooks skip
    the float epochs; the user's own validation metrics there are the float model's.
    Under DDP the float epochs leave the scale parameters unused: use
    ``strategy="ddp_find_unused_parameters_true"`` (anything else is refused in ``setup``).
    A checkpoint written in the float epochs holds no trained quantized model:
    :func:`~lightning_qsec.quant.load_quantized_checkpoint` refuses it and
    ``test(ckpt_path=...)`` warns (a ``ModelCheckpoint`` monitoring a validation metric
    compares float and quantized epochs: monitor from a quantized epoch on, or keep the last).
    :class:`~lightning_qsec.defenses.FairQuantizationTraining` takes its frozen teacher
    when the float epochs end.

    The configuration, the calibration flag and the exact activation-statistics state
    live in ``state_dict()``, so a resumed run matches an uninterrupted one. Load a
    checkpoint for inference with :func:`~lightning_qsec.quant.load_quantized_checkpoint`.

    Place it before ``ModelPruning`` in ``callbacks`` so pruning sees the quantized layers.

    Args:
        weight_bit_width: weight bit width, 2..16.
        act_bit_width: activation bit width, 2..16.
        layer_bit_widths: module-name glob -> bit width overrides.
        skip: module names or globs left in float.
        quantize_input: quantize the input of the first conv/linear layer.
        per_channel: per-output-channel weight scales.
        input_bit_width: a fixed bit width for the quantized input, the data's own
            precision (e.g. 8 for a w4a4 network fed 8-bit data), left as it is when
            evaluation hooks run the model at other bit widths; ``None``: ``act_bit_width``.
        calibrate_batches: training batches used to calibrate activation scales before
            quantized training (0 to let Brevitas collect statistics during the first steps).
        float_epochs: epochs of ``fit`` trained in float before quantized training starts
            (0: quantized from the first step).
        batch_adapter: reads batches for calibration; default :func:`~lightning_qsec.read_batch`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.callbacks import QuantizationAwareTraining
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[QuantizationAwareTraining(4, 4)])
    """

    def __init__(
        self,
        weight_bit_width: int = 8,
        act_bit_width: int = 8,
        *,
        layer_bit_widths: Mapping[str, int] | None = None,
        skip: Sequence[str] = (),
        quantize_input: bool = True,
        per_channel: bool = False,
        input_bit_width: int | None = None,
        calibrate_batches: int = 10,
        float_epochs: int = 0,
        batch_adapter: BatchAdapter | None = None,
    ) -> None:
        self.config = QuantConfig(
            weight_bit_width=weight_bit_width,
            act_bit_width=act_bit_width,
            layer_bit_widths=layer_bit_widths or {},
            skip=skip,
            quantize_input=quantize_input,
            per_channel=per_channel,
            input_bit_width=input_bit_width,
        )
        self.calibrate_batches = check_positive_int(calibrate_batches, "calibrate_batches", allow_zero=True)
        self.float_epochs = check_positive_int(float_epochs, "float_epochs", allow_zero=True)
        self._float_phase: ExitStack | None = None  # holds float_mode during the float epochs
        self.batch_adapter = batch_adapter
        self.calibrated = False
        self._module: pl.LightningModule | None = None
        self._synced_scalers: set[str] = set()

    @property
    def state_key(self) -> str:
        # One QAT callback per Trainer; a fixed key lets a resume with other settings be refused.
        return "QuantizationAwareTraining"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks = list(trainer.callbacks)
        others = [c for c in callbacks if isinstance(c, QuantizationAwareTraining) and c is not self]
        if others:
            raise ValueError("callbacks: use one QuantizationAwareTraining per Trainer")
        mine = callbacks.index(self)
        early = [type(c).__name__ for c in callbacks[:mine] if isinstance(c, ModelPruning)]
        if early:
            raise ValueError(
                f"callbacks: {early} come before QuantizationAwareTraining and would prune the float "
                "layers that QAT replaces; list QuantizationAwareTraining first"
            )
        if stage == "fit" and self.float_epochs:
            self._check_float_epochs(trainer)
        quantize_model(pl_module, **self.config.to_dict())
        self._module = pl_module
        self._synced_scalers = set()

    def _check_float_epochs(self, trainer: pl.Trainer) -> None:
        """Refuse DDP that would not find the unused scales; warn of SWA starting in the float epochs."""
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)  # DDPStrategy's arguments to DistributedDataParallel
        if isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(
                f"float_epochs={self.float_epochs} under DDP: the float epochs leave the quantizers' scale "
                "parameters unused, which DistributedDataParallel refuses unless it looks for them; use "
                "strategy='ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True))"
            )
        for swa in (c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)):
            start = swa._swa_epoch_start  # an int epoch (1-based) or a fraction of max_epochs, as SWA reads it
            if isinstance(start, float) and trainer.max_epochs is not None and trainer.max_epochs > 0:
                start = int(trainer.max_epochs * start)
            if isinstance(start, int) and max(start - 1, 0) < self.float_epochs:
                rank_zero_warn(
                    f"StochasticWeightAveraging starts averaging at epoch {max(start - 1, 0)} (0-based), inside "
                    f"QuantizationAwareTraining's float epochs (float_epochs={self.float_epochs}): it would average "
                    f"float-phase weights into the quantized model; set swa_epoch_start > {self.float_epochs}"
                )

    def in_float_phase(self, trainer: pl.Trainer) -> bool:
        """Whether ``fit`` is in its first ``float_epochs`` epochs, training with quantization off."""
        return trainer.state.fn == TrainerFn.FITTING and trainer.current_epoch < self.float_epochs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.in_float_phase(trainer):  # also a resume in the middle of a float epoch, whose start
            self._enter_float_phase(pl_module)  # Lightning does not call again
        elif not self.float_epochs:
            self._calibrate(trainer, pl_module)

    def _enter_float_phase(self, pl_module: pl.LightningModule) -> None:
        if self._float_phase is None:
            self._float_phase = ExitStack()
            self._float_phase.enter_context(float_mode(pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.in_float_phase(trainer):
            self._enter_float_phase(pl_module)
            return
        # the float epochs are over: quantized training starts here, calibrated on this epoch's
        # first batches (also when a resume starts at this epoch, so that it matches)
        self._leave_float_phase()
        self._calibrate(trainer, pl_module)

    def _leave_float_phase(self) -> None:
        stack, self._float_phase = self._float_phase, None
        if stack is not None:
            stack.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._float_phase is not None:  # a fit that ends inside its float epochs
            rank_zero_warn(
                f"QuantizationAwareTraining: fit ended in its float epochs (float_epochs={self.float_epochs}, "
                f"{trainer.current_epoch} epoch(s) run): the model has quantized layers whose scales were never "
                "calibrated nor trained; raise max_epochs above float_epochs"
            )
        self._leave_float_phase()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave_float_phase()

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.calibrated or self.calibrate_batches == 0:
            return
        loader = trainer.train_dataloader
        loader = getattr(loader, "iterables", loader)
        if isinstance(loader, Mapping) or isinstance(loader, (list, tuple)):
            raise ValueError(
                "calibrate_batches needs a single training dataloader; set calibrate_batches=0 "
                "or call lightning_qsec.calibrate yourself before fit"
            )
        adapter = self.batch_adapter
        if trainer.world_size > 1:
            loader, adapter = gathered_batches(trainer, loader, self.calibrate_batches, adapter), None
        # BatchNorm as training will run it: with batch statistics (running ones may be untrained)
        calibrate(pl_module, loader, self.calibrate_batches, batch_adapter=adapter, batchnorm="batch")
        self.calibrated = True
        rank_zero_info(f"QuantizationAwareTraining: activation scales calibrated on {self.calibrate_batches} batches")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Scales collected during training (calibrate_batches=0) come from each rank's own statistics,
        # and inside no_sync micro-batches DDP does not align them: when a scaler's collection ends,
        # take rank 0's scale, as DDP's buffer broadcast would. Every rank runs the same forwards, so
        # every rank sees the same scalers finish at the same step.
        if trainer.world_size < 2:
            return
        done = [
            (name, s) for name, s in stat_scalers(pl_module)
            if s.counter > s.collect_stats_steps and name not in self._synced_scalers
        ]  # fmt: skip
        if done:
            broadcast_from_rank_zero(t for _, s in done for t in (s.value, s.buffer))
            self._synced_scalers.update(name for name, _ in done)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Brevitas leaves out the scale of an activation quantizer that has not run yet (a
        # checkpoint of the float epochs), and a strict restore refuses the missing key: save its
        # initial value. The restore then ends collection, and load_state_dict below puts the
        # exact statistics state back.
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for name, scaler in stat_scalers(pl_module):
                state.setdefault(f"{name}.value", scaler.value.detach().clone())
        if self.in_float_phase(trainer):  # not a quantized model yet: load_quantized_checkpoint refuses it
            checkpoint[FLOAT_PHASE_KEY] = True

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if checkpoint.get(FLOAT_PHASE_KEY) and trainer.state.fn != TrainerFn.FITTING:
            rank_zero_warn(
                "QuantizationAwareTraining: this checkpoint was written in the float epochs (float_epochs="
                f"{self.float_epochs}); its quantizers were never calibrated, so the quantized model it gives is "
                "not a trained one: load a checkpoint of a quantized epoch (a monitored ModelCheckpoint compares "
                "float and quantized epochs)"
            )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "config": self.config.to_dict(), "calibrated": self.calibrated, "float_epochs": self.float_epochs
        }
        if self._module is not None:
            state["statistics"] = statistics_state(self._module)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = QuantConfig.from_dict(state_dict["config"])
        if saved != self.config:
            raise ValueError(
                f"checkpoint was trained with quantization settings {saved.to_dict()}, but this "
                f"QuantizationAwareTraining has {self.config.to_dict()}; use the same settings to resume"
            )
        saved_float = state_dict.get("float_epochs", 0)
        if saved_float != self.float_epochs:
            raise ValueError(
                f"checkpoint was trained with float_epochs={saved_float}, but this QuantizationAwareTraining "
                f"has float_epochs={self.float_epochs}; use the same settings to resume"
            )
        self.calibrated = bool(state_dict.get("calibrated", False))
        if self._module is not None and "statistics" in state_dict:
            load_statistics_state(self._module, state_dict["statistics"])
