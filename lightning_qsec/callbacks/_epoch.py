"""Which epoch a result outside ``fit`` belongs to: the one its weights were trained up to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

__all__ = ["checkpoint_epoch", "last_started_epoch"]


def checkpoint_epoch(checkpoint: Mapping[str, Any]) -> int | None:
    """The 0-based index of the last epoch that started before ``checkpoint`` was saved.

    That is the epoch ``fit``'s own validation labels those weights with, however the
    checkpoint was written: Lightning's ``checkpoint["epoch"]`` is the epoch index for a
    ``ModelCheckpoint`` save after validation but the number of completed epochs for
    ``trainer.save_checkpoint`` after ``fit``. Falls back to ``checkpoint["epoch"]`` when the
    loop state is missing; ``None`` when neither is there.
    """
    loops = checkpoint.get("loops")
    progress = loops.get("fit_loop", {}).get("epoch_progress", {}) if isinstance(loops, Mapping) else {}
    started = progress.get("current", {}).get("started") if isinstance(progress, Mapping) else None
    if isinstance(started, int) and started > 0:
        return started - 1
    epoch = checkpoint.get("epoch")
    return int(epoch) if isinstance(epoch, int) else None


def last_started_epoch(trainer: pl.Trainer) -> int:
    """The 0-based index of the last epoch this trainer's ``fit`` started (0 before any)."""
    return max(int(trainer.fit_loop.epoch_progress.current.started) - 1, 0)
