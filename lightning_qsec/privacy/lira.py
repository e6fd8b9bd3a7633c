"""Offline LiRA: the likelihood-ratio membership attack with OUT shadow models only."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_qsec.privacy._checks import _describe, check_finite, check_logits, check_tensor
from lightning_qsec.privacy.scores import _margin_to_rest

__all__ = ["lira_offline_scores"]

_MIN_STD = 1e-6  # floor of the fitted standard deviation, in logit units


def lira_offline_scores(
    target_logits: Tensor,
    targets: Tensor,
    shadow_logits_out: Tensor,
    *,
    variance: Literal["per_sample", "global"] = "per_sample",
) -> Tensor:
    """Offline LiRA scores (Carlini et al. 2022, https://arxiv.org/abs/2112.03570, Alg. 1 offline).

    For each sample the logit-scaled confidence ``phi = log(p_y / (1 - p_y))``
    (:func:`~lightning_qsec.privacy.logit_scaled_confidence`) is computed under the
    target model and under ``K`` shadow models that did **not** train on it (OUT
    models). A Gaussian ``N(mu, sigma^2)`` is fitted to the sample's ``K`` OUT values,
    and the one-sided test asks how unlikely a value at least as large as the target's
    is under it: the score is ``-log P(Z >= phi_target)``, i.e. minus the log p-value
    (the paper's ``1 - Pr[Z > phi]``, computed in log space so confident members do
    not tie). Higher scores mean "more likely a member".

    Args:
        target_logits: the target model's logits, shape ``(N, C)``, ``C >= 2``.
        targets: true class indices, shape ``(N,)``.
        shadow_logits_out: logits of ``K`` OUT shadow models on the same samples,
            shape ``(K, N, C)``; row ``k`` of sample ``i`` must come from a model that
            never saw sample ``i``.
        variance: ``"per_sample"`` fits ``sigma`` to each sample's ``K`` values
            (unbiased, needs ``K >= 2``); ``"global"`` uses one ``sigma`` for all
            samples, the standard deviation of all OUT values, which the paper
            recommends when there are few shadow models (then the ranking, and so the
            ROC curve, is that of ``phi - mu``). ``sigma`` is floored at 1e-6.

    Returns:
        float64 scores, shape ``(N,)``, on the CPU.

    Raises:
        ValueError: mismatched shapes, too few shadow models, NaN / infinite logits,
            or an unknown ``variance``.

    Example:
        >>> import torch
        >>> target = torch.tensor([[3.0, 0.0], [0.5, 0.0]])
        >>> shadows = torch.tensor([[[0.4, 0.0], [0.4, 0.0]], [[0.6, 0.0], [0.6, 0.0]]])
        >>> s = lira_offline_scores(target, torch.tensor([0, 0]), shadows)
        >>> bool(s[0] > s[1])
        True
    """
    if variance not in ("per_sample", "global"):
        raise ValueError(f"variance must be 'per_sample' or 'global', got {variance!r}")
    target_logits, targets = check_logits(target_logits, targets, "target_logits")
    assert targets is not None
    shadow = check_tensor(shadow_logits_out, "shadow_logits_out")
    if shadow.ndim != 3 or tuple(shadow.shape[1:]) != tuple(target_logits.shape) or not shadow.is_floating_point():
        raise ValueError(
            "`shadow_logits_out` must be floating-point logits of shape (K, N, C) = (K, "
            f"{target_logits.shape[0]}, {target_logits.shape[1]}) to match `target_logits`, got {_describe(shadow)}"
        )
    k = shadow.shape[0]
    need = 2 if variance == "per_sample" else 1
    if k < need:
        raise ValueError(
            f"lira_offline_scores(variance={variance!r}) needs at least {need} OUT shadow model(s), got {k}"
        )
    check_finite(shadow, "shadow_logits_out")
    shadow = shadow.detach().to("cpu", torch.float64)
    phi = _margin_to_rest(target_logits, targets)
    n, c = target_logits.shape
    phi_out = _margin_to_rest(shadow.reshape(k * n, c), targets.repeat(k)).reshape(k, n)
    mu = phi_out.mean(0)
    if variance == "per_sample":
        sigma = phi_out.std(0, correction=1)
    else:
        sigma = phi_out.std(correction=1 if phi_out.numel() > 1 else 0).expand(n)
    z = (phi - mu) / sigma.clamp_min(_MIN_STD)
    return -torch.special.log_ndtr(-z)
