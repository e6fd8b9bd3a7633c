"""Seeded bootstrap confidence intervals of the ROC metrics of a membership-inference attack."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_qsec._validation import check_probability, check_seed
from lightning_qsec.privacy._checks import check_scores
from lightning_qsec.privacy.roc import _roc_batch

__all__ = ["bootstrap_ci", "bootstrap_indices", "bootstrap_metrics"]

_CHUNK_ELEMENTS = 4_000_000  # resampled scores held at once (float64): about 32 MB


def bootstrap_indices(num_members: int, num_nonmembers: int, resamples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a stratified bootstrap: members and non-members resampled separately.

    Each resample draws, with replacement, as many members and as many non-members as
    there are, so both set sizes stay fixed. Using the same indices for several attacks
    or precisions pairs their resamples.

    Args:
        num_members: number of member samples, ``>= 1``.
        num_nonmembers: number of non-member samples, ``>= 1``.
        resamples: number of resamples, ``>= 1``.
        seed: seed of the CPU generator.

    Returns:
        ``(member_idx (R, Nm), nonmember_idx (R, Nn))``, int64.
    """
    if num_members < 1 or num_nonmembers < 1:
        raise ValueError(
            f"bootstrap needs at least one member and one held-out sample, got {num_members} and {num_nonmembers}"
        )
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return (
        torch.randint(num_members, (resamples, num_members), generator=gen),
        torch.randint(num_nonmembers, (resamples, num_nonmembers), generator=gen),
    )


def bootstrap_metrics(
    member: Tensor, nonmember: Tensor, member_idx: Tensor, nonmember_idx: Tensor
) -> dict[str, Tensor]:
    """Every ROC metric on each resample: ``{name: (R,) float64}`` (scores already checked)."""
    n = member_idx.shape[1] + nonmember_idx.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // n)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, member_idx.shape[0], chunk):
        stop = start + chunk
        parts.append(_roc_batch(member[member_idx[start:stop]], nonmember[nonmember_idx[start:stop]]))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def percentile_interval(values: Tensor, confidence: float) -> tuple[float, float]:
    """The two-sided percentile interval of ``values`` at ``confidence``."""
    alpha = (1.0 - confidence) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    low, high = torch.quantile(values.double(), q).tolist()
    return float(low), float(high)


def bootstrap_ci(
    member_scores: Tensor,
    nonmember_scores: Tensor,
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :func:`~lightning_qsec.privacy.roc_metrics`.

    Members and non-members are resampled separately, with replacement and at their own
    sizes (:func:`bootstrap_indices`); each resample's metrics are computed exactly and
    the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles are the interval
    (Efron and Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13). Seeded:
    the same inputs and seed give the same intervals.

    The TPR at a low FPR rests on the few highest-scoring non-members, so its interval
    is wide and coarse when there are few non-members.

    Args:
        member_scores: scores of training samples, shape ``(Nm,)``.
        nonmember_scores: scores of held-out samples, shape ``(Nn,)``.
        resamples: number of bootstrap resamples, ``>= 1``.
        confidence: confidence level, in ``(0, 1)``.
        seed: seed of the resampling.

    Returns:
        ``{name: (low, high)}`` for each name in :data:`~lightning_qsec.privacy.ROC_METRICS`.

    Raises:
        ValueError: an empty member or held-out set, non-finite scores, bad settings.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> ci = bootstrap_ci(torch.randn(500, generator=g) + 1, torch.randn(500, generator=g), seed=0)
        >>> ci["auc"][0] < 0.76 < ci["auc"][1]
        True
    """
    member, nonmember = check_scores(member_scores, nonmember_scores)
    check_probability(confidence, "confidence")
    check_seed(seed)
    m_idx, n_idx = bootstrap_indices(len(member), len(nonmember), resamples, seed)
    values = bootstrap_metrics(member, nonmember, m_idx, n_idx)
    return {k: percentile_interval(v, float(confidence)) for k, v in values.items()}
