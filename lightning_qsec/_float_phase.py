"""Whether ``QuantizationAwareTraining(float_epochs=N)`` is still training the float model.

Hardening and evaluation callbacks ask the trainer's callbacks (duck-typed, so that
``lightning_qsec.defenses`` need not import ``lightning_qsec.callbacks``).
"""

from __future__ import annotations

import pytorch_lightning as pl

__all__ = ["float_epochs", "in_float_phase"]


def in_float_phase(trainer: pl.Trainer | None) -> bool:
    """Whether a ``QuantizationAwareTraining`` among ``trainer.callbacks`` is in its float epochs.

    ``None`` (a hook called without a Trainer) is never in them.
    """
    callbacks = [] if trainer is None else trainer.callbacks
    return any(callable(getattr(cb, "in_float_phase", None)) and cb.in_float_phase(trainer) for cb in callbacks)


def float_epochs(trainer: pl.Trainer) -> int:
    """The ``float_epochs`` of the trainer's ``QuantizationAwareTraining`` (0 without one)."""
    qat = [cb for cb in trainer.callbacks if callable(getattr(cb, "in_float_phase", None))]
    return max((int(getattr(cb, "float_epochs", 0)) for cb in qat), default=0)
