"""Functional quantization-induced disparity: how much more accuracy the worst-hit group loses.

For each group ``g`` the accuracy drop is ``acc_float[g] - acc_quant[g]``; the average
drop is the drop of the overall accuracy (every sample weighted alike, i.e. the
size-weighted mean of the group drops). The disparity is

    ``max_g (acc_float[g] - acc_quant[g]) - (acc_float - acc_quant)``,

never negative: 0 when every group loses the same accuracy, and it grows when
quantization concentrates its errors on one group (Hooker et al., "Characterising Bias
in Compressed Models", 2020, https://arxiv.org/abs/2010.03058). A group that *gains*
accuracy counts with a negative drop. fairlearn has no such metric; it is built from
fairlearn-style per-group accuracies.

Example:
    >>> import torch
    >>> target = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    >>> groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> float_preds = target.clone()                       # both groups 100 %
    >>> quant_preds = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])  # group 1 drops to 50 %
    >>> quantization_induced_disparity(float_preds, quant_preds, target, groups)  # 0.5 - 0.25
    tensor(0.2500)
"""

from __future__ import annotations

from torch import Tensor

from lightning_qsec.metrics.functional._checks import check_same_num_classes, to_labels
from lightning_qsec.metrics.functional._groups import (
    as_result,
    check_group_counts,
    check_num_groups,
    group_count,
    group_sum,
    infer_num_groups,
    ratio,
    read_inputs,
)

__all__ = ["group_accuracy_drop", "quantization_induced_disparity"]


def _qid_update(
    float_preds: Tensor, quant_preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ``(float_correct, quant_correct, total)`` counts of one batch, each ``(G,)`` int64."""
    check_same_num_classes(float_preds=float_preds, quant_preds=quant_preds)
    quant = to_labels(quant_preds, "quant_preds")
    labels, target, groups = read_inputs(float_preds, target, groups, num_groups, binary=None)
    read_inputs(quant, target, groups, num_groups, binary=None)  # length check against quant_preds
    if num_groups is None:
        num_groups = infer_num_groups(groups)
    return (
        group_sum(labels == target, groups, num_groups),
        group_sum(quant.to(target.device) == target, groups, num_groups),
        group_count(groups, num_groups),
    )


def _group_accuracy_drop_from_counts(float_correct: Tensor, quant_correct: Tensor, total: Tensor) -> Tensor:
    """Per-group accuracy drop ``(..., G)`` in float64."""
    return ratio(float_correct - quant_correct, total)


def _qid_from_counts(float_correct: Tensor, quant_correct: Tensor, total: Tensor) -> Tensor:
    """Worst group drop minus overall drop, over the last dimension (float64)."""
    drops = _group_accuracy_drop_from_counts(float_correct, quant_correct, total)
    overall = ratio((float_correct - quant_correct).sum(-1), total.sum(-1))
    return drops.amax(-1) - overall


def group_accuracy_drop(
    float_preds: Tensor, quant_preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None
) -> Tensor:
    """Per-group accuracy drop float -> quantized, a float tensor ``(G,)`` (negative: a gain).

    Arguments and errors as in :func:`quantization_induced_disparity`.
    """
    if num_groups is not None:
        check_num_groups(num_groups, "group_accuracy_drop")
    counts = _qid_update(float_preds, quant_preds, target, groups, num_groups)
    check_group_counts(counts[2], "group_accuracy_drop")
    return as_result(_group_accuracy_drop_from_counts(*counts))


def quantization_induced_disparity(
    float_preds: Tensor, quant_preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None = None
) -> Tensor:
    """How much more accuracy the worst-hit group loses than the average, float -> quantized.

    Args:
        float_preds: predictions of the float model, class indices ``(N,)`` or
            logits/probabilities ``(N, C)``. Any number of classes.
        quant_preds: predictions of the quantized model on the same samples, either form.
        target: true class indices ``(N,)``.
        groups: integer group labels ``0..G-1``, shape ``(N,)``.
        num_groups: ``G``; default ``max(groups) + 1``.

    Returns:
        A 0-d float tensor, ``>= 0`` (lower is better): worst group drop minus overall drop.

    Raises:
        ValueError: on a bad shape or dtype, different ``N`` or ``C``, a ``num_groups``
            that is not an integer >= 1, a group label outside ``0..G-1``, empty inputs, a
            group without samples or a group with a single sample.
    """
    if num_groups is not None:
        check_num_groups(num_groups, "quantization_induced_disparity")
    counts = _qid_update(float_preds, quant_preds, target, groups, num_groups)
    check_group_counts(counts[2], "quantization_induced_disparity")
    return as_result(_qid_from_counts(*counts))
