"""Backdoor metrics with BackdoorBench's definitions (Wu et al., NeurIPS 2022 Datasets and
Benchmarks, https://arxiv.org/abs/2206.12654), as torchmetrics metrics.

* :class:`CleanAccuracy`: accuracy on clean samples (C-Acc).
* The attack success rate is :class:`~lightning_qsec.metrics.AttackSuccessRate` with
  ``targeted=True`` (triggered samples outside the target class classified as the target).
* :class:`DefenseEffectivenessRate`: ``[max(0, ASR_before - ASR_after) - max(0, ACC_before
  - ACC_after) + 1] / 2``, from the predictions of the model before and after a defense.

States are sum-reduced counts, so every metric is exact under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._correct_count import CorrectCount
from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional._checks import safe_ratio
from lightning_qsec.metrics.functional.attack_success_rate import _attack_success_rate_update
from lightning_qsec.metrics.functional.backdoor import _clean_accuracy_update, defense_effectiveness_rate

__all__ = ["CleanAccuracy", "DefenseEffectivenessRate"]


class CleanAccuracy(CorrectCount):
    """BackdoorBench's clean accuracy: the share of clean samples classified correctly.

    Example:
        >>> import torch
        >>> metric = CleanAccuracy()
        >>> metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
        >>> metric.update(torch.tensor([[0.2, 0.8]]), torch.tensor([1]))
        >>> metric.compute()
        tensor(0.7500)
    """

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch: ``preds`` class indices ``(N,)`` or scores ``(N, C)``, ``target`` ``(N,)``."""
        self._add(*_clean_accuracy_update(preds, target))


class DefenseEffectivenessRate(CountStateMetric):
    """BackdoorBench's defense effectiveness rate (DER) of a backdoor defense.

    Each :meth:`update` takes the predictions of the backdoored model (``before``) and
    of the defended model (``after``) on the same clean and triggered samples. Clean
    accuracy is :class:`CleanAccuracy`'s; attack success is
    :class:`~lightning_qsec.metrics.AttackSuccessRate`'s (``targeted=True``), so samples
    of the target class are left out of the ASR. :meth:`compute` returns
    ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``.
    The states are sum-reduced counts: ``correct_before``, ``correct_after`` and
    ``total`` (clean samples), ``successes_before``, ``successes_after`` and ``attempts``
    (triggered samples outside the target class). Called on a batch (``forward``), it
    adds the batch like :meth:`update` and returns the batch's own DER, ``nan`` where
    that batch alone leaves it undefined (no sample outside the target class).

    Example:
        >>> import torch
        >>> y = torch.tensor([0, 1, 2, 3])
        >>> der = DefenseEffectivenessRate()
        >>> der.update(before_clean=y, before_triggered=torch.tensor([0, 0, 0, 0]),
        ...            after_clean=torch.tensor([0, 1, 2, 0]), after_triggered=y, target=y, attack_target=0)
        >>> der.compute()  # ASR 1 -> 0, accuracy 1 -> 0.75
        tensor(0.8750)
    """

    is_differentiable: bool = False
    higher_is_better: bool = True
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    correct_before: Tensor
    correct_after: Tensor
    total: Tensor
    successes_before: Tensor
    successes_after: Tensor
    attempts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("correct_before", "correct_after", "total", "successes_before", "successes_after", "attempts"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        *,
        before_clean: Tensor,
        before_triggered: Tensor,
        after_clean: Tensor,
        after_triggered: Tensor,
        target: Tensor,
        attack_target: int | Tensor,
    ) -> None:
        """Add one batch of predictions (class indices ``(N,)`` or scores ``(N, C)``).

        Args:
            before_clean: the backdoored model on clean inputs.
            before_triggered: the backdoored model on triggered inputs.
            after_clean: the defended model on clean inputs.
            after_triggered: the defended model on triggered inputs.
            target: true class indices ``(N,)``.
            attack_target: the backdoor's target class (int, 0-d tensor or ``(N,)``).
        """
        if attack_target is None:
            raise ValueError("`attack_target` is required: DefenseEffectivenessRate measures a backdoor's target class")
        correct_before, total = _clean_accuracy_update(before_clean, target)
        correct_after, _ = _clean_accuracy_update(after_clean, target)
        successes_before, attempts = _attack_success_rate_update(before_clean, before_triggered, target, attack_target)
        successes_after, _ = _attack_success_rate_update(after_clean, after_triggered, target, attack_target)
        self._add(correct_before, correct_after, total, successes_before, successes_after, attempts)

    def _value(
        self, *, correct_before: Tensor, correct_after: Tensor, total: Tensor,
        successes_before: Tensor, successes_after: Tensor, attempts: Tensor,
    ) -> Tensor:
        """DER; raises ``ValueError`` when a part is ``nan`` (no update, or no eligible sample)."""
        return defense_effectiveness_rate(
            asr_before=safe_ratio(successes_before, attempts), asr_after=safe_ratio(successes_after, attempts),
            acc_before=safe_ratio(correct_before, total), acc_after=safe_ratio(correct_after, total),
        )
