"""Input checks and per-group counts shared by the group-fairness metrics (private).

Group labels are integer indices ``0..G-1`` of shape ``(N,)``. The metrics keep one
count per group in fixed-size ``(G,)`` tensors, so their states are sum-reducible and
exact under DDP. The ``*_from_counts`` helpers of the metric modules work on counts
with any leading batch dimensions (``(..., G)``), which the bootstrap of
:class:`~lightning_qsec.callbacks.FairnessEvaluation` uses; they give ``nan`` where a
rate is undefined. The public functions and ``compute()`` first call
:func:`check_group_counts`, which turns those cases into clear errors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_qsec.metrics.functional._checks import (
    _describe,
    _is_integer,
    check_same_length,
    check_target,
    to_labels,
)


def check_num_groups(num_groups: object, owner: str) -> int:
    """``num_groups`` as an int ``>= 1``, else a ``ValueError`` naming ``owner``."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(
            f"{owner}: `num_groups` must be an integer >= 1 (the number of sensitive groups, whose "
            f"labels are 0..num_groups-1), got {num_groups!r}"
        )
    return num_groups


def check_groups(groups: Tensor, num_groups: int | None) -> Tensor:
    """Check that ``groups`` is a 1-D integer tensor with labels in ``0..num_groups-1``.

    Raises:
        TypeError: if ``groups`` is not a tensor.
        ValueError: on another shape or dtype, or a label out of range (named in the message).
    """
    if not isinstance(groups, Tensor):
        raise TypeError(f"`groups` must be a torch.Tensor, got {type(groups).__name__}")
    if groups.ndim != 1 or not _is_integer(groups):
        raise ValueError(
            f"`groups` must be integer group labels 0..G-1 of shape (N,), got {_describe(groups)}"
        )
    if groups.numel():
        low, high = int(groups.min()), int(groups.max())
        if low < 0 or (num_groups is not None and high >= num_groups):
            bad = low if low < 0 else high
            allowed = f"0..{num_groups - 1}" if num_groups is not None else "0..G-1 (non-negative)"
            raise ValueError(
                f"`groups` has label {bad}, outside {allowed}"
                + (f" for num_groups={num_groups}" if num_groups is not None else "")
                + "; group labels must be integer indices 0..num_groups-1"
            )
    return groups


def infer_num_groups(groups: Tensor) -> int:
    """``max(groups) + 1`` for the functional metrics (which take ``num_groups=None``)."""
    if groups.numel() == 0:
        raise ValueError("The inputs are empty (N=0): group metrics need at least one sample per group")
    return int(groups.max()) + 1


def binary_labels(preds: Tensor, name: str, owner: str) -> Tensor:
    """Binary predicted labels from labels ``(N,)`` or scores ``(N, 2)``; other shapes/values raise."""
    if isinstance(preds, Tensor) and preds.ndim == 2 and preds.shape[1] != 2:
        raise ValueError(
            f"{owner} is defined for binary classification only: `{name}` as logits/probabilities "
            f"must have shape (N, 2), got {_describe(preds)}"
        )
    labels = to_labels(preds, name)
    check_binary_values(labels, name, owner)
    return labels


def check_binary_values(x: Tensor, name: str, owner: str) -> None:
    """Raise a ``ValueError`` unless every value of ``x`` is 0 or 1."""
    if x.numel() and ((x != 0) & (x != 1)).any():
        found = sorted({int(v) for v in torch.unique(x)[:10]})
        raise ValueError(
            f"{owner} is defined for binary classification only: `{name}` must hold 0 (negative) and "
            f"1 (positive) labels, found values {found}"
        )


def read_inputs(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int | None, *, binary: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Predicted labels, targets and groups, checked; ``binary`` names a binary-only metric."""
    labels = binary_labels(preds, "preds", binary) if binary else to_labels(preds, "preds")
    target = check_target(target)
    if binary:
        check_binary_values(target, "target", binary)
    groups = check_groups(groups, num_groups)
    check_same_length(preds=labels, target=target, groups=groups)
    return labels, target, groups.to(target.device)


def group_sum(mask: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Per-group count of ``True`` entries of ``mask``, shape ``(num_groups,)``, int64."""
    return torch.zeros(num_groups, dtype=torch.long, device=groups.device).index_add_(
        0, groups.long(), mask.long()
    )


def group_count(groups: Tensor, num_groups: int) -> Tensor:
    """Per-group number of samples, shape ``(num_groups,)``, int64."""
    return torch.zeros(num_groups, dtype=torch.long, device=groups.device).index_add_(
        0, groups.long(), torch.ones_like(groups, dtype=torch.long)
    )


def check_group_counts(total: Tensor, owner: str) -> None:
    """Clear errors for no samples, a group without samples, or a group with a single sample.

    Args:
        total: per-group sample counts ``(G,)`` over everything seen (all batches, all ranks).
        owner: the metric's name, for the message.
    """
    total = total.detach().cpu()
    if int(total.sum()) == 0:
        raise ValueError(f"{owner}: no samples were seen (empty inputs or no update): nothing to compute")
    missing = [g for g, n in enumerate(total.tolist()) if n == 0]
    if missing:
        raise ValueError(
            f"{owner}: group label(s) {missing} have no samples (counts per group: {total.tolist()}). "
            "Every group 0..num_groups-1 must be present: pass the right num_groups, or relabel the "
            "groups to consecutive integers"
        )
    single = [g for g, n in enumerate(total.tolist()) if n == 1]
    if single:
        raise ValueError(
            f"{owner}: group(s) {single} have a single sample (counts per group: {total.tolist()}); "
            "a group rate from one sample is not a meaningful estimate. Merge small groups or "
            "evaluate on more data"
        )


def check_rate_denominators(den: Tensor, owner: str, what: str) -> None:
    """Raise if any group has a zero denominator for a conditional rate (e.g. no positives for TPR)."""
    empty = [g for g, n in enumerate(den.detach().cpu().tolist()) if n == 0]
    if empty:
        raise ValueError(
            f"{owner}: group(s) {empty} have no samples with {what}, so their rate is undefined "
            "(fairlearn would silently report 0 for them); evaluate on more data"
        )


def ratio(num: Tensor, den: Tensor) -> Tensor:
    """Elementwise ``num / den`` in float64, ``nan`` where ``den == 0``."""
    num, den = num.to(torch.float64), den.to(torch.float64)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.nan)


def as_result(x: Tensor) -> Tensor:
    """A float64 result in the default float dtype, as the other metrics return."""
    return x.to(torch.get_default_dtype())


def spread(rates: Tensor) -> Tensor:
    """``max - min`` over the last (group) dimension; ``nan`` if any rate is ``nan``."""
    return rates.amax(-1) - rates.amin(-1)
