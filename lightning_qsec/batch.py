"""One place that reads a batch: ``(x, y)``, ``(x, y, group)``, lists and dicts.

Every callback of lightning-qsec reads batches through :func:`read_batch`, or
through a user's ``batch_adapter=`` callable that returns a :class:`Batch`.

Example:
    >>> import torch
    >>> b = read_batch({"image": torch.zeros(2, 1, 8, 8), "label": torch.tensor([1, 2])})
    >>> b.inputs.shape, b.targets.tolist(), b.groups
    (torch.Size([2, 1, 8, 8]), [1, 2], None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "BatchAdapter", "adapter_or_default", "as_device", "describe_batch", "read_batch"]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "data")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")
GROUP_KEYS = ("group", "groups", "sensitive", "sensitive_attribute", "a")


@dataclass(frozen=True)
class Batch:
    """A batch as lightning-qsec sees it.

    Attributes:
        inputs: model inputs, shape ``(N, ...)``.
        targets: integer class labels, shape ``(N,)``.
        groups: optional integer group labels (sensitive attribute), shape ``(N,)``.
    """

    inputs: Tensor
    targets: Tensor
    groups: Tensor | None = None


BatchAdapter = Callable[[Any], Batch]


def describe_batch(batch: Any, _depth: int = 0) -> str:
    """A short description of a batch's type and structure, for error messages."""
    if isinstance(batch, Tensor):
        return f"Tensor(shape={tuple(batch.shape)}, dtype={batch.dtype})"
    if _depth > 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{k!r}: {describe_batch(v, _depth + 1)}" for k, v in batch.items())
        return f"{type(batch).__name__}{{{inner}}}"
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        inner = ", ".join(describe_batch(v, _depth + 1) for v in batch)
        return f"{type(batch).__name__}[{inner}]"
    return type(batch).__name__


def _error(batch: Any, why: str) -> ValueError:
    return ValueError(
        f"Cannot read batch of {describe_batch(batch)}: {why}. Expected (x, y), (x, y, group), "
        f"or a dict with an input key {INPUT_KEYS}, a target key {TARGET_KEYS} and optionally "
        f"a group key {GROUP_KEYS}; pass batch_adapter=callable(batch) -> lightning_qsec.Batch "
        "for other formats."
    )


def _pick(batch: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    return None


def read_batch(batch: Any) -> Batch:
    """Read a tuple, list or dict batch into a :class:`Batch`.

    Args:
        batch: ``(x, y)``, ``(x, y, group)``, the same as a list, or a dict with
            the keys listed in this module (``x``/``image``/..., ``y``/``label``/...,
            ``group``/...). A :class:`Batch` is returned unchanged.

    Returns:
        The batch's inputs, integer targets and optional groups.

    Raises:
        ValueError: if the batch has another structure; the message names its
            type and structure.
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping):
        x, y, g = _pick(batch, INPUT_KEYS), _pick(batch, TARGET_KEYS), _pick(batch, GROUP_KEYS)
        for value, keys, what in ((x, INPUT_KEYS, "input"), (y, TARGET_KEYS, "target")):
            if value is None:
                raise _error(batch, f"no {what} key found among {keys}")
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (2, 3):
            raise _error(batch, f"a sequence of length {len(batch)}, not 2 or 3")
        x, y = batch[0], batch[1]
        g = batch[2] if len(batch) == 3 else None
    else:
        raise _error(batch, "not a tuple, list or dict")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise _error(batch, "inputs and targets must both be tensors")
    if x.dim() == 0:
        raise _error(batch, "inputs must have a batch dimension (N, ...)")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise _error(batch, "targets must be a 1-D integer tensor of class labels")
    if x.shape[0] != y.shape[0]:
        raise _error(batch, f"inputs have {x.shape[0]} rows but targets {y.shape[0]}")
    if g is not None:
        if not isinstance(g, Tensor) or g.dim() != 1 or g.shape[0] != y.shape[0]:
            raise _error(batch, "groups must be a 1-D tensor with one label per row")
        if g.dtype.is_floating_point or g.dtype.is_complex:
            raise _error(batch, f"groups must be integer group labels, got dtype {g.dtype}")
    return Batch(inputs=x, targets=y, groups=g)


def adapter_or_default(batch_adapter: BatchAdapter | None, *, owner: str | None = None) -> BatchAdapter:
    """The user's adapter, checked to return a :class:`Batch`, or :func:`read_batch`.

    With ``owner`` (a callback's name) the reader's own errors (a batch :func:`read_batch`
    cannot read, an adapter that does not return a :class:`Batch`) start with the owner's
    name, so the message says which callback read the batch; an exception raised by the
    user's adapter itself is re-raised unchanged, with a note naming the owner.
    """
    prefix = f"{owner}: " if owner else ""

    def checked(batch: Any) -> Batch:
        if batch_adapter is None:
            try:
                return read_batch(batch)
            except ValueError as error:
                if not owner:
                    raise
                raise ValueError(f"{prefix}{error}") from None
        try:
            out = batch_adapter(batch)
        except Exception as error:
            if owner:
                error.add_note(f"raised by the batch_adapter of {owner}")
            raise
        if not isinstance(out, Batch):
            raise TypeError(f"{prefix}batch_adapter must return lightning_qsec.Batch, got {type(out).__name__}")
        return out

    return checked


def as_device(batch: Batch, device: torch.device) -> Batch:
    """The batch moved to ``device``."""
    groups = batch.groups.to(device) if batch.groups is not None else None
    return Batch(batch.inputs.to(device), batch.targets.to(device), groups)
