"""The :class:`SecurityReport` callback: collects evaluation hooks' sections and writes them."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from lightning_qsec.callbacks._epoch import checkpoint_epoch
from lightning_qsec.report.section import EvaluationHook, ReportSection
from lightning_qsec.report.writer import write_report

__all__ = ["SecurityReport"]

Stage = Literal["fit", "test", "validate"]
_STAGES: tuple[str, ...] = ("fit", "test", "validate")


class SecurityReport(pl.Callback):
    """Write a security report at the end of the configured trainer stages.

    At the end of each stage in ``on``, every callback in ``trainer.callbacks`` that
    satisfies :class:`~lightning_qsec.report.section.EvaluationHook` is asked for its
    ``report_section()`` (``None`` results are skipped) and the sections are written
    with :func:`~lightning_qsec.report.writer.write_report` on global rank zero
    only. A later stage overwrites the previous report in the same ``dirpath``.

    Hooks are queried during this callback's own ``on_fit_end`` / ``on_test_end`` /
    ``on_validation_end``; a hook that computes its results in the same hook must
    therefore come before ``SecurityReport`` in ``Trainer(callbacks=[...])``.

    The report's metadata records the stage, completed epochs, global step, the model
    class, the last epoch the weights of a ``validate``/``test(ckpt_path=...)`` run were
    trained in (``checkpoint_epoch``, 0-based, as ``fit``'s validation labels it), the model's quantization settings
    (``quantization``: the :class:`~lightning_qsec.quant.QuantConfig` it was quantized
    with) and the settings of the package's hardening callbacks in the trainer
    (``training``: each one's ``config()`` under its ``state_key``).

    Args:
        dirpath: output directory for ``report.json``, ``report.md`` and plots.
        on: stages after which the report is written: ``"fit"``, ``"test"``
            and/or ``"validate"`` (a standalone ``trainer.validate()``, not the
            validation loops inside ``fit``).

    Attributes:
        dirpath: the output directory.
        on: the configured stages.
        last_report_path: path of the last written ``report.json`` (``None`` before
            the first write and on non-zero ranks).

    Example::

        trainer = pl.Trainer(callbacks=[MyEvaluationHook(), SecurityReport("qsec_report")])
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] = "qsec_report",
        *,
        on: Sequence[Stage] = ("fit", "test"),
    ) -> None:
        if on is None or not isinstance(on, (str, Sequence)):
            raise ValueError(f"SecurityReport: `on` must be a stage or a sequence of stages of {_STAGES}, got {on!r}")
        stages = (on,) if isinstance(on, str) else tuple(on)
        if not stages:
            raise ValueError(f"SecurityReport: `on` must name at least one stage of {_STAGES}, got {on!r}")
        for stage in stages:
            if stage not in _STAGES:
                raise ValueError(
                    f"SecurityReport: unknown stage {stage!r} in `on`, expected one of {_STAGES}"
                )
        self.dirpath: Path = Path(dirpath)
        if self.dirpath.exists() and not self.dirpath.is_dir():
            raise ValueError(
                f"SecurityReport: dirpath {str(dirpath)!r} is a file; expected a directory (made if missing)"
            )
        self.on: tuple[str, ...] = stages
        self.last_report_path: Path | None = None
        self._checkpoint_epoch: int | None = None  # of the checkpoint this stage loaded, if any

    @property
    def state_key(self) -> str:
        """Unique per output directory, so several reports can share a trainer."""
        return self._generate_state_key(dirpath=str(self.dirpath))

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: the output directory."""
        return {"dirpath": str(self.dirpath)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget the previous stage's checkpoint (this stage's restore comes after ``setup``)."""
        self._checkpoint_epoch = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember the loaded checkpoint's epoch, for the metadata of a ``test(ckpt_path=...)`` report."""
        self._checkpoint_epoch = checkpoint_epoch(checkpoint)

    def collect_sections(self, trainer: pl.Trainer) -> list[ReportSection]:
        """Ask every evaluation hook among ``trainer.callbacks`` for its section.

        Args:
            trainer: the trainer.

        Returns:
            The non-``None`` sections, in callback order.
        """
        sections: list[ReportSection] = []
        seen: Counter[str] = Counter()
        for callback in trainer.callbacks:
            if callback is self or not isinstance(callback, EvaluationHook):
                continue
            section = callback.report_section()
            if section is None:
                continue
            seen[section.name] += 1
            if seen[section.name] > 1:  # a second hook of one kind (other settings): its own name and files
                n, name = seen[section.name], section.name
                section = dataclasses.replace(
                    section,
                    name=f"{name}_{n}",
                    title=f"{section.title} ({n})",
                    plots=[dataclasses.replace(p, filename=f"{name}_{n}_{p.filename}") for p in section.plots],
                )
            sections.append(section)
        return sections

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Collect and write the report (global rank zero only)."""
        if stage not in self.on or not trainer.is_global_zero:
            return
        metadata = {
            "stage": stage,
            "epochs_completed": trainer.current_epoch,
            "global_step": trainer.global_step,
            "model": type(pl_module).__name__,
        }
        if stage != "fit" and self._checkpoint_epoch is not None:  # the trainer's own epoch is not the model's
            metadata["checkpoint_epoch"] = self._checkpoint_epoch
        settings = [m.qsec_config for m in pl_module.modules() if isinstance(getattr(m, "qsec_config", None), dict)]
        if settings:  # the QuantConfig the model was quantized with (bit widths, input width, globs)
            metadata["quantization"] = settings[0]
        recipe = {
            c.state_key: c.config()
            for c in trainer.callbacks
            if any(k.__module__.startswith("lightning_qsec.") for k in type(c).__mro__)  # a user's subclass too
            and callable(getattr(c, "config", None))
        }
        if recipe:  # the hardening callbacks' settings (AT eps, regularizer coefficients, fair QAT mode)
            metadata["training"] = recipe
        sections = self.collect_sections(trainer)
        self.last_report_path = write_report(self.dirpath, sections, metadata=metadata)
        rank_zero_info(f"Security report written to {self.last_report_path}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the report after ``trainer.fit`` if ``"fit"`` is in ``on``."""
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the report after ``trainer.test`` if ``"test"`` is in ``on``."""
        self._write(trainer, pl_module, "test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the report after a standalone ``trainer.validate`` if ``"validate"`` is in ``on``.

        Lightning has no ``on_validate_end``; this hook also runs inside ``fit``, where
        it does nothing.
        """
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._write(trainer, pl_module, "validate")
