"""Exact ROC analysis of a membership-inference attack: AUC, TPR at low FPR, advantage.

Members are the positives. A threshold ``t`` predicts "member" for scores ``>= t``;
every distinct score is a threshold, so the curve is exact (no binning), and tied
scores move along the curve together, as in :func:`sklearn.metrics.roc_curve`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_qsec.privacy._checks import check_scores

__all__ = ["ROC_METRICS", "roc_curve", "roc_metrics"]

#: The numbers :func:`roc_metrics` returns, in order.
ROC_METRICS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "advantage")
_FPR_LEVELS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}


def _group_counts(member: Tensor, nonmember: Tensor) -> tuple[Tensor, Tensor]:
    """Members and non-members per distinct score, highest score first, for each row.

    Args:
        member: ``(R, Nm)`` scores.
        nonmember: ``(R, Nn)`` scores.

    Returns:
        ``(tp, fp)``, each ``(R, Nm + Nn)`` float64: the counts of the ``k``-th highest
        distinct score of each row in column ``k``; columns past the last distinct
        score are 0.
    """
    r = member.shape[0]
    scores = torch.cat([member, nonmember], dim=1)
    labels = torch.cat(
        [torch.ones_like(member), torch.zeros_like(nonmember)], dim=1
    )
    order = scores.argsort(dim=1, descending=True, stable=True)
    s = scores.gather(1, order)
    lab = labels.gather(1, order)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.long().cumsum(1) - 1
    tp = torch.zeros(r, s.shape[1], dtype=torch.float64).scatter_add_(1, group, lab)
    fp = torch.zeros(r, s.shape[1], dtype=torch.float64).scatter_add_(1, group, 1.0 - lab)
    return tp, fp


def _roc_batch(member: Tensor, nonmember: Tensor) -> dict[str, Tensor]:
    """:data:`ROC_METRICS` for each row of ``(R, Nm)`` member and ``(R, Nn)`` non-member scores."""
    n_m, n_n = member.shape[1], nonmember.shape[1]
    tp, fp = _group_counts(member, nonmember)
    tpr = tp.cumsum(1) / n_m
    fpr = fp.cumsum(1) / n_n
    # Trapezoids between consecutive distinct thresholds (ties give the diagonal segment).
    auc = (fp / n_n * (2 * tpr - tp / n_m)).sum(1) / 2
    out = {"auc": auc}
    for name, level in _FPR_LEVELS.items():
        # tpr and fpr rise along the curve: the best TPR with FPR <= level (0 if none).
        out[name] = torch.where(fpr <= level, tpr, torch.zeros_like(tpr)).amax(1)
    out["advantage"] = (tpr - fpr).amax(1).clamp_min(0.0)
    return out


def roc_curve(member_scores: Tensor, nonmember_scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact ROC curve of a membership-inference attack.

    Args:
        member_scores: scores of training samples (positives), shape ``(Nm,)``.
        nonmember_scores: scores of held-out samples (negatives), shape ``(Nn,)``.

    Returns:
        ``(fpr, tpr, thresholds)``, float64, one point per distinct score plus the
        starting point ``(0, 0)`` with threshold ``+inf``; equal to
        ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.

    Raises:
        ValueError: an empty member or held-out set, non-1-D or non-finite scores.
    """
    member, nonmember = check_scores(member_scores, nonmember_scores)
    tp, fp = _group_counts(member[None], nonmember[None])
    distinct = torch.cat([member, nonmember]).unique(sorted=True).flip(0)
    k = len(distinct)
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp[0, :k].cumsum(0) / len(member)])
    fpr = torch.cat([zero, fp[0, :k].cumsum(0) / len(nonmember)])
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), distinct])
    return fpr, tpr, thresholds


def roc_metrics(member_scores: Tensor, nonmember_scores: Tensor) -> dict[str, float]:
    """AUC, TPR at 1 % and 0.1 % FPR, and membership advantage of an attack.

    * ``auc``: area under the exact ROC curve, ties counted half (the Mann-Whitney
      statistic: ``P(member score > non-member score) + P(equal) / 2``).
    * ``tpr_at_1pct_fpr`` / ``tpr_at_0.1pct_fpr``: the largest TPR over thresholds
      whose FPR is at most 1 % / 0.1 %, the low-FPR regime Carlini et al. 2022
      argue matters (https://arxiv.org/abs/2112.03570). With ``Nn`` non-members the
      FPR moves in steps of ``1 / Nn``: with fewer than 1,000 non-members
      ``tpr_at_0.1pct_fpr`` allows no false positive at all.
    * ``advantage``: ``max_t TPR(t) - FPR(t)``, the membership advantage of Yeom et
      al. 2018 (https://arxiv.org/abs/1709.01604) for the best threshold, in ``[0, 1]``.

    All are threshold-free, best-threshold numbers: an attacker who must pick the
    threshold without the membership labels does no better. Tied scores are never
    split (no randomised thresholds, as in scikit-learn): a quantized model's coarse
    outputs can put more than 1 % of the non-members in the top tie, and then the TPR
    at 1 % FPR is 0.

    Args:
        member_scores: scores of training samples (positives), shape ``(Nm,)``.
        nonmember_scores: scores of held-out samples (negatives), shape ``(Nn,)``.

    Returns:
        ``{name: value}`` for the names in :data:`ROC_METRICS`.

    Raises:
        ValueError: an empty member or held-out set, non-1-D or non-finite scores.

    Example:
        >>> import torch
        >>> m = roc_metrics(torch.tensor([0.9, 0.8, 0.3]), torch.tensor([0.7, 0.2]))
        >>> round(m["auc"], 4), round(m["advantage"], 4)
        (0.8333, 0.6667)
    """
    member, nonmember = check_scores(member_scores, nonmember_scores)
    return {k: float(v[0]) for k, v in _roc_batch(member[None], nonmember[None]).items()}
