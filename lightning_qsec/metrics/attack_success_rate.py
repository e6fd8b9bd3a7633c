"""Attack success rate as a torchmetrics :class:`~torchmetrics.Metric`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_qsec.metrics._count_state import CountStateMetric
from lightning_qsec.metrics.functional.attack_success_rate import (
    _attack_success_rate_compute,
    _attack_success_rate_update,
)

__all__ = ["AttackSuccessRate"]


class AttackSuccessRate(CountStateMetric):
    """Fraction of eligible samples on which an (untargeted or targeted) attack succeeds.

    **Denominator.** Which samples are eligible depends on ``targeted``:

    * ``targeted=False`` (evasion): the samples the model classifies correctly on clean
      input (``clean_pred == target``). Samples already misclassified on clean input are
      excluded, as usual in the adversarial-robustness literature (e.g. Carlini & Wagner,
      2017, https://arxiv.org/abs/1608.04644). Success: ``adv_pred != target``.
    * ``targeted=True`` (targeted attack or backdoor): the samples whose true label differs
      from ``attack_target`` (``target != attack_target``), whatever the clean prediction.
      Samples of the target class are excluded, as in BackdoorBench (Wu et al., 2022,
      https://arxiv.org/abs/2206.12654). Success: ``adv_pred == attack_target``.
      ``clean_preds`` is checked but does not enter the count.

    The metric keeps two sum-reduced counts, ``successes`` and ``attempts`` (the
    denominator), so it is exact under DDP whatever the shard sizes. :meth:`compute`
    returns ``nan`` when the denominator is 0 (no update yet, no correctly classified
    sample, or no sample outside the target class). Called on a batch (``forward``), it
    adds the batch like :meth:`update` and returns the batch's own rate (``nan`` if its
    denominator is 0); a batch that :meth:`update` rejects leaves the counts unchanged.

    Lower is better for the defender (``higher_is_better=False``).

    Args:
        targeted: whether the attack is targeted; then :meth:`update` needs
            ``attack_target``.
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> target = torch.tensor([0, 1, 2, 3])
        >>> clean = torch.tensor([0, 1, 2, 0])  # the last sample is already wrong
        >>> adv = torch.tensor([1, 1, 0, 0])
        >>> untargeted = AttackSuccessRate()
        >>> untargeted.update(clean, adv, target)
        >>> untargeted.compute()  # 2 of the 3 correctly classified samples flipped
        tensor(0.6667)
        >>> targeted = AttackSuccessRate(targeted=True)
        >>> targeted.update(clean, adv, target, attack_target=0)
        >>> targeted.compute()  # 2 of the 3 samples outside class 0 pushed to class 0
        tensor(0.6667)
    """

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    successes: Tensor
    attempts: Tensor

    def __init__(self, *, targeted: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(targeted, bool):
            raise ValueError(f"`targeted` must be a bool, got {targeted!r}")
        self.targeted = targeted
        self.add_state("successes", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("attempts", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        clean_preds: Tensor,
        adv_preds: Tensor,
        target: Tensor,
        attack_target: int | Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            clean_preds: predictions on clean inputs, integer class indices ``(N,)`` or
                logits/probabilities ``(N, C)``.
            adv_preds: predictions on adversarial (or triggered) inputs, in either form.
            target: true integer class indices ``(N,)``.
            attack_target: the attacker's target class (an int or NumPy integer, a 0-d
                integer tensor or one class per sample ``(N,)``); required when
                ``targeted=True`` and not allowed otherwise.

        Raises:
            ValueError: if ``attack_target`` is missing with ``targeted=True`` or given with
                ``targeted=False``, if an argument has another shape or dtype, or if the
                arguments have different ``N`` (or different ``C`` when both predictions
                are ``(N, C)``).
        """
        if self.targeted and attack_target is None:
            raise ValueError("`attack_target` is required when AttackSuccessRate(targeted=True)")
        if not self.targeted and attack_target is not None:
            raise ValueError(
                "`attack_target` was given but AttackSuccessRate(targeted=False) measures an untargeted "
                "attack; create the metric with targeted=True"
            )
        self._add(*_attack_success_rate_update(clean_preds, adv_preds, target, attack_target))

    def _value(self, *, successes: Tensor, attempts: Tensor) -> Tensor:
        """Attack success rate; ``nan`` if the denominator is 0."""
        return _attack_success_rate_compute(successes, attempts)
