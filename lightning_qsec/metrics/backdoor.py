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

from torch import Tensor
from torchmetrics import Metric

from lightning_qsec.metrics.attack_success_rate import AttackSuccessRate
from lightning_qsec.metrics._correct_count import CorrectCount
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


class DefenseEffectivenessRate(Metric):
    """BackdoorBench's defense effectiveness rate (DER) of a backdoor defense.

    Each :meth:`update` takes the predictions of the backdoored model (``before``) and
    of the defended model (``after``) on the same clean and triggered samples. Clean
    accuracy is :class:`CleanAccuracy`; attack success is
    :class:`~lightning_qsec.metrics.AttackSuccessRate` (``targeted=True``), so samples
    of the target class are left out of the ASR. :meth:`compute` returns
    ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``;
    the four parts are the child metrics ``acc_before``, ``acc_after``, ``asr_before``
    and ``asr_after``.

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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acc_before = CleanAccuracy(**kwargs)
        self.acc_after = CleanAccuracy(**kwargs)
        self.asr_before = AttackSuccessRate(targeted=True, **kwargs)
        self.asr_after = AttackSuccessRate(targeted=True, **kwargs)

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
        self.acc_before.update(before_clean, target)
        self.acc_after.update(after_clean, target)
        self.asr_before.update(before_clean, before_triggered, target, attack_target=attack_target)
        self.asr_after.update(after_clean, after_triggered, target, attack_target=attack_target)

    def compute(self) -> Tensor:
        """DER over all batches; raises ``ValueError`` when a part is ``nan`` (no update, or no eligible sample)."""
        return defense_effectiveness_rate(
            asr_before=self.asr_before.compute(), asr_after=self.asr_after.compute(),
            acc_before=self.acc_before.compute(), acc_after=self.acc_after.compute(),
        )

    def reset(self) -> None:
        """Reset the four parts."""
        super().reset()
        for child in (self.acc_before, self.acc_after, self.asr_before, self.asr_after):
            child.reset()
