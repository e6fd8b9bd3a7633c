"""The lifecycle every evaluation hook shares: when to measure, batch routing, results state."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_qsec._float_phase import float_epochs, in_float_phase
from lightning_qsec._validation import check_positive_int
from lightning_qsec.callbacks._epoch import checkpoint_epoch, last_started_epoch
from lightning_qsec.defenses.random_precision import RandomPrecisionTraining
from lightning_qsec.quant.precision import at_precision
from lightning_qsec.quant.spec import Precision

__all__ = ["EvaluationCallback", "Stage", "STAGES"]

Stage = Literal["validate", "test"]
STAGES: tuple[str, ...] = ("validate", "test")


class EvaluationCallback(pl.Callback):
    """Base of the evaluation hooks: measure at validation (every N epochs) and at test.

    A subclass implements :meth:`_start` (the stage's first batch is coming),
    :meth:`_update` (one evaluation batch) and :meth:`_finish` (compute and return the
    stage's result dict). This base never runs in the sanity check nor in the float
    epochs of ``QuantizationAwareTraining(float_epochs=...)``, applies
    ``every_n_epochs`` only inside ``fit``, keeps :attr:`results` (latest per stage) and
    :attr:`history` in ``state_dict``, and raises a clear error when a standalone
    ``trainer.validate()``/``trainer.test()`` measured nothing (an empty dataloader:
    Lightning skips the loop silently). Hooks switch precision with :meth:`precision`,
    which uses the precision's own BatchNorm statistics when a
    :class:`~lightning_qsec.defenses.RandomPrecisionTraining` with ``switchable_bn=True``
    trains the module.

    Args:
        every_n_epochs: measure at validation every this many epochs of ``fit``.
        stages: ``"validate"`` (validation inside fit, and ``trainer.validate``) and/or ``"test"``.
    """

    #: What an empty evaluation loop means for this hook, for the error message.
    empty_stage_meaning: str = "nothing to measure"

    def __init__(self, *, every_n_epochs: int = 1, stages: Sequence[Stage] = STAGES) -> None:
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        if isinstance(stages, str) or not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"stages must be a non-empty sequence of {list(STAGES)}, got {stages!r}")
        self.stages: list[str] = list(dict.fromkeys(stages))
        self.results: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self._active = False
        self._measured_in_stage = False
        self._switchable: tuple[RandomPrecisionTraining, nn.Module] | None = None
        self._checkpoint_epoch: int | None = None  # of the checkpoint this stage loaded, if any

    def precision(self, model: nn.Module, precision: Precision) -> AbstractContextManager[Any]:
        """``model`` at ``precision``, in place: :func:`~lightning_qsec.quant.at_precision`, or,
        for the module a ``RandomPrecisionTraining(switchable_bn=True)`` trains, its
        :meth:`~lightning_qsec.defenses.RandomPrecisionTraining.switched` (that precision's
        BatchNorm statistics too)."""
        if self._switchable is not None and model is self._switchable[1]:
            return self._switchable[0].switched(model, precision)
        return at_precision(model, weight_bit_width=precision.weight_bit_width, act_bit_width=precision.act_bit_width)

    # ------------------------------------------------------------------ subclass API
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        raise NotImplementedError

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ routing
    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if in_float_phase(trainer):
            return  # QAT's float epochs: no quantized model to measure yet
        self._active = True
        switcher = next(
            (cb for cb in trainer.callbacks if isinstance(cb, RandomPrecisionTraining) and cb.switchable_bn), None
        )
        self._switchable = None if switcher is None else (switcher, pl_module)
        self._start(trainer, pl_module)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if not self._active:
            return
        self._active = False
        result = self._finish(trainer, pl_module, stage)
        self.results[stage] = result
        self.history.append(result)
        self._measured_in_stage = True

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module, "validate")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active:
            self._update(trainer, pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module, "test")

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active:
            self._update(trainer, pl_module, batch, batch_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    def epoch(self, trainer: pl.Trainer) -> int:
        """The 0-based epoch a result belongs to: ``trainer.current_epoch`` inside ``fit``;
        in ``validate``/``test``, the last epoch the weights were trained in: that of the
        checkpoint ``ckpt_path=`` loaded, else that of this trainer's ``fit`` (0 without one)."""
        if trainer.state.fn == TrainerFn.FITTING:
            return int(trainer.current_epoch)
        if self._checkpoint_epoch is not None:
            return self._checkpoint_epoch
        return last_started_epoch(trainer)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint_epoch = checkpoint_epoch(checkpoint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._measured_in_stage = False
        self._checkpoint_epoch = None  # setup comes before this stage's checkpoint restore
        max_epochs, first = trainer.max_epochs, float_epochs(trainer)  # no measurement in QAT's float epochs
        measures = max_epochs is None or max_epochs < 0 or any(
            (epoch + 1) % self.every_n_epochs == 0 for epoch in range(first, max_epochs)
        )
        if stage == "fit" and "validate" in self.stages and max_epochs != 0 and not measures:
            floats = f", QuantizationAwareTraining float_epochs={first}" if first else ""
            rank_zero_warn(
                f"{type(self).__name__}(every_n_epochs={self.every_n_epochs}) will not measure during this fit "
                f"(max_epochs={max_epochs}{floats}); lower every_n_epochs or run trainer.validate()/test() afterwards"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))
        if stage in self.stages and not self._measured_in_stage:
            raise ValueError(
                f"{type(self).__name__} measured nothing in trainer.{stage}(): {self.empty_stage_meaning}; "
                f"the {stage} dataloader is empty (Lightning skips evaluation loops without batches)"
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
