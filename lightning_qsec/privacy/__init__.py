"""Membership inference: does a model (float or quantized) leak who was in its training set?

A functional core on logits and scores, with no Lightning needed; the
:class:`~lightning_qsec.callbacks.MembershipInferenceEvaluation` hook runs it for the float
model and each precision.

* Scores (higher = more likely a member): :func:`loss_threshold_scores` (Yeom et al.
  2018), :func:`confidence_scores` (Salem et al. 2019) and :func:`lira_offline_scores`
  (offline LiRA, Carlini et al. 2022).
* Evaluation: :func:`roc_metrics` (exact AUC, TPR at 1 % and 0.1 % FPR, membership
  advantage), :func:`roc_curve` and :func:`bootstrap_ci` (seeded percentile intervals).

Example:
    >>> import torch
    >>> from lightning_qsec.privacy import loss_threshold_scores, roc_metrics
    >>> g = torch.Generator().manual_seed(0)
    >>> members = loss_threshold_scores(torch.randn(100, 3, generator=g) * 3, torch.zeros(100, dtype=torch.long))
    >>> others = loss_threshold_scores(torch.randn(100, 3, generator=g), torch.zeros(100, dtype=torch.long))
    >>> sorted(roc_metrics(members, others))
    ['advantage', 'auc', 'tpr_at_0.1pct_fpr', 'tpr_at_1pct_fpr']
"""

from lightning_qsec.privacy.bootstrap import bootstrap_ci, bootstrap_indices
from lightning_qsec.privacy.lira import lira_offline_scores
from lightning_qsec.privacy.roc import ROC_METRICS, roc_curve, roc_metrics
from lightning_qsec.privacy.scores import confidence_scores, logit_scaled_confidence, loss_threshold_scores

__all__ = [
    "ROC_METRICS",
    "bootstrap_ci",
    "bootstrap_indices",
    "confidence_scores",
    "lira_offline_scores",
    "logit_scaled_confidence",
    "loss_threshold_scores",
    "roc_curve",
    "roc_metrics",
]
