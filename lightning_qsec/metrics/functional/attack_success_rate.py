"""Functional attack success rate (untargeted evasion or targeted/backdoor attacks).

Example:
    >>> import torch
    >>> clean, adv, target = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 0]), torch.tensor([0, 1, 2, 1])
    >>> attack_success_rate(clean, adv, target)  # 3 correct on clean input, 2 of them flipped
    tensor(0.6667)
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from lightning_qsec.metrics.functional._checks import (
    check_same_length,
    check_same_num_classes,
    check_target,
    safe_ratio,
    to_labels,
)

__all__ = ["attack_success_rate"]


def _check_attack_target(attack_target: int | Tensor, target: Tensor) -> Tensor:
    """``attack_target`` as a tensor broadcastable to ``target``: a scalar or one class per sample."""
    if isinstance(attack_target, numbers.Integral) and not isinstance(attack_target, bool):  # int, NumPy integer
        return torch.tensor(int(attack_target), device=target.device)
    if not isinstance(attack_target, Tensor):
        raise ValueError(
            "`attack_target` must be an integer, a 0-d integer tensor or integer class indices of shape (N,), "
            f"got {type(attack_target).__name__}"
        )
    is_integer = not attack_target.is_floating_point() and not attack_target.is_complex()
    if attack_target.dtype == torch.bool or not is_integer or attack_target.ndim > 1:
        raise ValueError(
            "`attack_target` must be an integer, a 0-d integer tensor or integer class indices of shape (N,), "
            f"got shape {tuple(attack_target.shape)} and dtype {attack_target.dtype}"
        )
    if attack_target.ndim == 1:
        check_same_length(target=target, attack_target=attack_target)
    return attack_target.to(target.device)


def _attack_success_rate_update(
    clean_preds: Tensor,
    adv_preds: Tensor,
    target: Tensor,
    attack_target: int | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Count successful attacks and eligible samples in one batch.

    Untargeted when ``attack_target`` is None, targeted otherwise.

    Returns:
        ``(successes, attempts)`` as 0-d integer tensors.
    """
    check_same_num_classes(clean_preds=clean_preds, adv_preds=adv_preds)
    clean = to_labels(clean_preds, "clean_preds")
    adv = to_labels(adv_preds, "adv_preds")
    target = check_target(target)
    check_same_length(clean_preds=clean, adv_preds=adv, target=target)
    if attack_target is None:
        eligible = clean == target
        success = eligible & (adv != target)
    else:
        goal = _check_attack_target(attack_target, target)
        eligible = target != goal
        success = eligible & (adv == goal)
    return success.sum(), eligible.sum()


def _attack_success_rate_compute(successes: Tensor, attempts: Tensor) -> Tensor:
    """Attack success rate from counts; ``nan`` when ``attempts`` is 0."""
    return safe_ratio(successes, attempts)


def attack_success_rate(
    clean_preds: Tensor,
    adv_preds: Tensor,
    target: Tensor,
    *,
    attack_target: int | Tensor | None = None,
) -> Tensor:
    """Fraction of eligible samples on which an attack succeeds.

    The denominator depends on the kind of attack:

    * **Untargeted** (``attack_target=None``): the samples the model classifies
      correctly on clean input (``clean == target``); an attack succeeds when the
      adversarial prediction is wrong (``adv != target``). Samples already misclassified
      on clean input are excluded, as usual in the adversarial-robustness literature
      (e.g. Carlini & Wagner, 2017, https://arxiv.org/abs/1608.04644), so that the rate
      measures the attack rather than the model's clean error.
    * **Targeted** (``attack_target`` given): the samples whose true label differs from
      ``attack_target`` (``target != attack_target``); an attack succeeds when the
      adversarial prediction equals ``attack_target``. Samples of the target class are
      excluded, as in BackdoorBench (Wu et al., 2022, https://arxiv.org/abs/2206.12654).
      ``clean_preds`` is checked but does not enter the result.

    Args:
        clean_preds: predictions on clean inputs, either integer class indices of shape
            ``(N,)`` or logits/probabilities of shape ``(N, C)`` (reduced with ``argmax``
            over dim 1).
        adv_preds: predictions on the adversarial (or triggered) inputs, in either form.
        target: true integer class indices of shape ``(N,)``.
        attack_target: the attacker's target class for a targeted attack: an integer
            (``int`` or NumPy integer, not ``bool``), a 0-d integer tensor, or one class per
            sample of shape ``(N,)``. None for an untargeted attack.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (lower is better for the defender); ``nan`` when
        the denominator is 0 (no correctly classified sample, or no sample outside the
        target class).

    Raises:
        TypeError: if ``clean_preds``, ``adv_preds`` or ``target`` is not a tensor.
        ValueError: if an argument has another shape or dtype, if the arguments have
            different ``N``, or if both predictions are ``(N, C)`` with different ``C``.

    Example:
        >>> import torch
        >>> target = torch.tensor([0, 1, 2, 3])
        >>> adv = torch.tensor([0, 0, 0, 3])  # a backdoor pushing samples to class 0
        >>> attack_success_rate(target, adv, target, attack_target=0)  # class-0 sample excluded
        tensor(0.6667)
    """
    counts = _attack_success_rate_update(clean_preds, adv_preds, target, attack_target)
    return _attack_success_rate_compute(*counts)
