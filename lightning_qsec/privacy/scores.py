"""Per-sample membership scores from a model's logits (higher = more likely a training member).

All scores are computed in float64 in log space, so very confident predictions do not
saturate into ties (a probability of ``1 - 1e-20`` is still told apart from ``1 - 1e-30``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_qsec.privacy._checks import check_logits

__all__ = ["confidence_scores", "logit_scaled_confidence", "loss_threshold_scores"]


def _margin_to_rest(logits: Tensor, index: Tensor) -> Tensor:
    """``z_i - logsumexp_{j != i} z_j`` for the class ``i = index`` of each row (float64)."""
    picked = logits.gather(1, index[:, None]).squeeze(1)
    others = logits.scatter(1, index[:, None], float("-inf"))
    return picked - torch.logsumexp(others, dim=1)


def loss_threshold_scores(logits: Tensor, targets: Tensor) -> Tensor:
    """Loss-threshold attack scores: minus the cross-entropy loss of each sample.

    The attack of Yeom et al. 2018, "Privacy Risk in Machine Learning: Analyzing the
    Connection to Overfitting" (https://arxiv.org/abs/1709.01604): training samples
    tend to have a lower loss, so ``-loss = log p_y`` is larger for members.

    Args:
        logits: model outputs before the softmax, shape ``(N, C)``, ``C >= 2``.
        targets: true class indices, shape ``(N,)``.

    Returns:
        float64 scores ``log softmax(logits)[y]``, shape ``(N,)``, on the CPU.

    Raises:
        ValueError: wrong shapes, targets out of range, or NaN / infinite logits.

    Example:
        >>> import torch
        >>> scores = loss_threshold_scores(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> [round(v, 4) for v in scores.tolist()]
        [-0.1269, -2.1269]
    """
    logits, targets = check_logits(logits, targets)
    assert targets is not None
    # log p_y = -log(1 + sum_{j != y} exp(z_j - z_y)) = -softplus(lse_{j != y} z_j - z_y): exact in the tails.
    return -F.softplus(-_margin_to_rest(logits, targets))


def confidence_scores(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    kind: Literal["max", "true_class"] = "max",
) -> Tensor:
    """Confidence-threshold attack scores: the log of the model's confidence.

    ``kind="max"`` (default) uses the largest softmax probability, which needs no
    label (Salem et al. 2019, "ML-Leaks", https://arxiv.org/abs/1806.01246, adversary 3).
    ``kind="true_class"`` uses the probability of the true class; its ranking, and so
    its ROC curve, is exactly that of :func:`loss_threshold_scores`.

    Scores are log-probabilities: monotone in the probability, so the attack is the same,
    but without float saturation at 1.

    Args:
        logits: model outputs before the softmax, shape ``(N, C)``, ``C >= 2``.
        targets: true class indices ``(N,)``; required for ``kind="true_class"``,
            checked (shape and range) but unused for ``kind="max"``.
        kind: ``"max"`` or ``"true_class"``.

    Returns:
        float64 scores, shape ``(N,)``, on the CPU.

    Raises:
        ValueError: wrong shapes, unknown ``kind``, missing targets for
            ``"true_class"``, or NaN / infinite logits.

    Example:
        >>> import torch
        >>> [round(v, 4) for v in confidence_scores(torch.tensor([[0.0, 0.0], [0.0, 5.0]])).exp().tolist()]
        [0.5, 0.9933]
    """
    if kind not in ("max", "true_class"):
        raise ValueError(f"kind must be 'max' or 'true_class', got {kind!r}")
    logits, targets = check_logits(logits, targets)
    if kind == "true_class":
        if targets is None:
            raise ValueError("confidence_scores(kind='true_class') needs `targets`")
        index = targets
    else:
        index = logits.argmax(1)
    return -F.softplus(-_margin_to_rest(logits, index))


def logit_scaled_confidence(logits: Tensor, targets: Tensor) -> Tensor:
    """The logit-scaled confidence ``log(p_y / (1 - p_y))`` of LiRA.

    Carlini et al. 2022, "Membership Inference Attacks From First Principles"
    (https://arxiv.org/abs/2112.03570), Section IV-B: after this scaling the
    confidence of one sample across models is well approximated by a Gaussian. It is
    computed stably as ``z_y - logsumexp_{j != y} z_j``.

    Args:
        logits: model outputs before the softmax, shape ``(N, C)``, ``C >= 2``.
        targets: true class indices, shape ``(N,)``.

    Returns:
        float64 values, shape ``(N,)``, on the CPU.

    Example:
        >>> import torch
        >>> logit_scaled_confidence(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).tolist()
        [2.0]
    """
    logits, targets = check_logits(logits, targets)
    assert targets is not None
    return _margin_to_rest(logits, targets)
