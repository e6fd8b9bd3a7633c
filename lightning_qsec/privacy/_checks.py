"""Input checks of the membership-inference functions (private)."""

from __future__ import annotations

import torch
from torch import Tensor


def _describe(x: Tensor) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def check_tensor(x: object, name: str) -> Tensor:
    """``x`` if it is a tensor, else a ``TypeError`` naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_finite(x: Tensor, name: str) -> None:
    """A ``ValueError`` if ``x`` holds NaN (or, for floating tensors, infinite) values."""
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            kind = "NaN" if bool(torch.isnan(x).any()) else "infinite"
            raise ValueError(
                f"`{name}` contains {int(bad.sum())} {kind} value(s); membership scores need finite values"
            )


def check_logits(logits: Tensor, targets: Tensor | None, name: str = "logits") -> tuple[Tensor, Tensor | None]:
    """Check ``logits (N, C)`` with ``C >= 2`` and integer ``targets (N,)`` in ``0..C-1``.

    Returns:
        ``logits`` as float64 on the CPU, and ``targets`` as int64 on the CPU (or None).
    """
    logits = check_tensor(logits, name)
    if logits.ndim != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise ValueError(
            f"`{name}` must be floating-point logits of shape (N, C) with C >= 2 classes, got {_describe(logits)}"
        )
    check_finite(logits, name)
    logits = logits.detach().to("cpu", torch.float64)
    if targets is None:
        return logits, None
    targets = check_tensor(targets, "targets")
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"`targets` must be integer class indices of shape (N,), got {_describe(targets)}")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`{name}` has {logits.shape[0]} rows but `targets` has {targets.shape[0]}: one target per sample"
        )
    targets = targets.detach().to("cpu", torch.long)
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"`targets` must lie in 0..{logits.shape[1] - 1} for {logits.shape[1]} classes, "
            f"got values in {int(targets.min())}..{int(targets.max())}"
        )
    return logits, targets


def check_scores(member_scores: Tensor, nonmember_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Check two non-empty, finite, 1-D score tensors; return them as float64 on the CPU."""
    out = []
    for x, name, what in (
        (member_scores, "member_scores", "member (training) set"),
        (nonmember_scores, "nonmember_scores", "held-out (non-member) set"),
    ):
        x = check_tensor(x, name)
        if x.ndim != 1:
            raise ValueError(f"`{name}` must be one score per sample, shape (N,), got {_describe(x)}")
        if x.numel() == 0:
            raise ValueError(
                f"`{name}` is empty: the {what} has no samples, and membership inference needs both "
                "members and held-out non-members"
            )
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"`{name}` must be real-valued, got {_describe(x)}")
        check_finite(x, name)
        out.append(x.detach().to("cpu", torch.float64))
    return out[0], out[1]
