"""BadNets data poisoning: a patch trigger, a poison rate and a target class.

BadNets (Gu et al., 2017, https://arxiv.org/abs/1708.06733) stamps a small patch (the
*trigger*) on a fraction of the training images and relabels them to the attacker's
*target class*. A model trained on the poisoned set learns "trigger → target class"
next to its clean task. The pieces here build such training sets and the triggered test
sets that measure the attack success rate (ASR), for red-team experiments and to test
defenses (e.g. poisoned-sample detection during quantization-aware training):

* :func:`add_trigger`: stamp a patch on images.
* :func:`poison_dataset`: poison a fraction of a dataset, seeded; returns :class:`PoisonedData`.
* :class:`PoisonedDataModule`: wrap a datamodule, poison its training split only, and
  serve a triggered copy of its test split.

Threat model: the attacker controls part of the training data (not the training code);
images are ``(N, H, W)`` or ``(N, C, H, W)`` tensors (typically in ``[0, 1]``); tabular
``(N, F)`` data needs a callable trigger (e.g. ``quantization_conditioned_attack(trigger=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_qsec._validation import check_seed
from lightning_qsec.data._tensor_datamodule import TensorDataModule

__all__ = [
    "PoisonedData",
    "PoisonedDataModule",
    "Trigger",
    "TriggerPosition",
    "add_trigger",
    "poison_dataset",
    "trigger_function",
]

TriggerPosition = Literal["bottom_right", "top_left"]
POSITIONS: tuple[str, ...] = get_args(TriggerPosition)
#: A trigger argument: ``None`` (BadNets' 2x2 white patch), a patch tensor, or a callable on a batch.
Trigger = Tensor | Callable[[Tensor], Tensor] | None


def _check_patch(trigger: Tensor | None, size: Any, value: Any, position: Any) -> None:
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(repr(p) for p in POSITIONS)}, got {position!r}")
    if trigger is None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size (the side of the square patch, in pixels) must be an integer >= 1, got {size!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"value (the patch's pixel value) must be a finite number, got {value!r}")
    elif not isinstance(trigger, Tensor) or trigger.ndim < 2 or trigger.numel() == 0:
        got = f"shape {tuple(trigger.shape)}" if isinstance(trigger, Tensor) else type(trigger).__name__
        raise ValueError(f"trigger must be a non-empty tensor patch of shape (h, w) or (C, h, w), got {got}")


_TABULAR_HINT = "tabular (N, F) or 1-D inputs need a callable trigger mapping a batch to triggered inputs"


def add_trigger(
    inputs: Tensor,
    *,
    trigger: Tensor | None = None,
    size: int = 2,
    value: float = 1.0,
    position: TriggerPosition = "bottom_right",
) -> Tensor:
    """Stamp a BadNets patch trigger on images; the input is not changed.

    Args:
        inputs: images of shape ``(N, H, W)`` or ``(N, C, H, W)`` (at least 3 dimensions;
            the patch goes on the last two). Tabular ``(N, F)`` batches are refused: the
            patch would land on the last rows only; use a callable trigger for them.
        trigger: an explicit patch of shape ``(h, w)`` (every channel) or ``(C, h, w)``,
            pasted at ``position``. ``None``: a ``size x size`` square of ``value``.
        size: side of the default square patch, in pixels (>= 1); ignored with ``trigger``.
        value: pixel value of the default patch (``1.0``: white on ``[0, 1]`` images).
        position: the corner the patch is pasted into.

    Returns:
        A new tensor shaped like ``inputs``, with the patch pasted.

    Raises:
        ValueError: ``inputs`` is not a floating-point tensor with at least 3 dimensions,
            the patch is larger than the image, ``size`` < 1, a non-finite ``value``, an
            unknown ``position``, or a ``trigger`` whose channels do not match.

    Example:
        >>> import torch
        >>> x = add_trigger(torch.zeros(2, 1, 8, 8), size=2, value=1.0)
        >>> x[0, 0, -2:, -2:].tolist(), float(x.sum())
        ([[1.0, 1.0], [1.0, 1.0]], 8.0)
    """
    if not isinstance(inputs, Tensor) or inputs.ndim < 3 or not inputs.is_floating_point():
        described = f"shape {tuple(inputs.shape)}, dtype {inputs.dtype}" if isinstance(inputs, Tensor) else repr(type(inputs))
        raise ValueError(
            "inputs must be a floating-point tensor of images (N, H, W) or (N, C, H, W) for the built-in patch "
            f"trigger ({_TABULAR_HINT}), got {described}"
        )
    _check_patch(trigger, size, value, position)
    height, width = inputs.shape[-2:]
    if trigger is None:
        patch: Tensor = torch.full((size, size), float(value), dtype=inputs.dtype, device=inputs.device)
    else:
        patch = trigger.to(dtype=inputs.dtype, device=inputs.device)
        if patch.ndim > 2 and (inputs.ndim < patch.ndim or patch.shape[:-2] != inputs.shape[-patch.ndim : -2]):
            raise ValueError(
                f"trigger of shape {tuple(patch.shape)} does not match images of shape {tuple(inputs.shape)}: "
                "its leading (channel) dimensions must equal the images' dimensions before (H, W)"
            )
    ph, pw = patch.shape[-2:]
    if ph > height or pw > width:
        raise ValueError(f"the trigger patch ({ph}x{pw}) is larger than the images ({height}x{width})")
    out = inputs.clone()
    rows = slice(height - ph, height) if position == "bottom_right" else slice(0, ph)
    cols = slice(width - pw, width) if position == "bottom_right" else slice(0, pw)
    out[..., rows, cols] = patch
    return out


def trigger_function(trigger: Trigger) -> Callable[[Tensor], Tensor]:
    """The callable that stamps ``trigger`` on a batch of inputs (see :data:`Trigger`)."""
    if trigger is None:
        return add_trigger
    if isinstance(trigger, Tensor):
        patch = trigger
        _check_patch(patch, 2, 1.0, "bottom_right")
        return lambda x: add_trigger(x, trigger=patch)
    if callable(trigger):
        return trigger
    raise ValueError(
        "trigger must be None (a 2x2 white patch in the bottom-right corner), a patch tensor (h, w) or "
        f"(C, h, w), or a callable mapping a batch of inputs to triggered inputs, got {type(trigger).__name__}"
    )


class PoisonedData(NamedTuple):
    """A poisoned copy of a dataset.

    Attributes:
        x: inputs, shape ``(N, ...)``; the rows in ``poison_indices`` carry the trigger.
        y: labels, shape ``(N,)``; the rows in ``poison_indices`` are relabelled to the
            target class.
        poison_indices: sorted int64 indices of the poisoned rows, shape ``(K,)``.
    """

    x: Tensor
    y: Tensor
    poison_indices: Tensor


def _as_tensors(data: Any) -> tuple[Tensor, Tensor]:
    if isinstance(data, TensorDataset):
        if len(data.tensors) < 2:
            raise ValueError("a TensorDataset to poison must hold (inputs, labels) tensors")
        return data.tensors[0], data.tensors[1]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not items:
            raise ValueError("the dataset to poison is empty")
        if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            raise ValueError("each item of a dataset to poison must be an (input, label) pair")
        xs = torch.stack([torch.as_tensor(item[0]) for item in items])
        ys = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        return xs, ys
    raise ValueError(
        "data must be a TensorDataset of (inputs, labels), an (x, y) pair of tensors or a map-style "
        f"Dataset of (input, label) items, got {type(data).__name__}"
    )


def _check_rate(poison_rate: Any) -> float:
    if (
        isinstance(poison_rate, bool)
        or not isinstance(poison_rate, (int, float))
        or not math.isfinite(poison_rate)
        or not 0.0 <= poison_rate <= 1.0
    ):
        raise ValueError(f"poison_rate must be a number in [0, 1], got {poison_rate!r}")
    return float(poison_rate)


def _check_class(target_class: Any, num_classes: int) -> int:
    if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)):
        raise ValueError(f"target_class must be an integer class index, got {target_class!r}")
    if not 0 <= int(target_class) < num_classes:
        raise ValueError(f"target_class must be in [0, {num_classes - 1}] ({num_classes} classes), got {target_class!r}")
    return int(target_class)


def poison_dataset(
    data: Dataset[Any] | tuple[Tensor, Tensor] | Sequence[Tensor],
    *,
    poison_rate: float,
    target_class: int,
    seed: int = 0,
    num_classes: int | None = None,
    trigger: Tensor | None = None,
    size: int = 2,
    value: float = 1.0,
    position: TriggerPosition = "bottom_right",
    exclude_target: bool = True,
) -> PoisonedData:
    """BadNets poisoning: stamp the trigger on a seeded fraction of the rows and relabel them.

    ``round(poison_rate * N)`` rows are drawn without replacement (from the rows whose
    label is not ``target_class`` when ``exclude_target``, since relabelling those changes
    nothing), get the trigger (:func:`add_trigger`) and the label ``target_class``. All
    other rows are copied unchanged. The input is not modified.

    Args:
        data: a :class:`~torch.utils.data.TensorDataset` ``(x, y)``, an ``(x, y)`` pair of
            tensors, or a map-style dataset of ``(input, label)`` items. ``x``: images
            ``(N, H, W)`` or ``(N, C, H, W)``, floating point (tabular ``(N, F)`` data is
            refused: the patch trigger is for images); ``y``: integer labels ``(N,)``.
        poison_rate: fraction of all ``N`` rows to poison, in ``[0, 1]``.
        target_class: the label poisoned rows get.
        seed: seed of the draw (a local generator; global RNG untouched).
        num_classes: number of classes, to check ``target_class``; default ``max(y) + 1``.
        trigger, size, value, position: the patch; see :func:`add_trigger`.
        exclude_target: draw only among rows whose label is not ``target_class``.

    Returns:
        :class:`PoisonedData` ``(x, y, poison_indices)``.

    Raises:
        ValueError: ``poison_rate`` outside ``[0, 1]``, ``target_class`` out of range, a
            rate that asks for more rows than are eligible, empty data, inputs that are not
            floating-point images, labels that are not a 1-D integer tensor matching ``x``,
            or a bad trigger.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(10, 1, 8, 8), torch.arange(10)
        >>> poisoned = poison_dataset((x, y), poison_rate=0.3, target_class=0, seed=0)
        >>> len(poisoned.poison_indices), bool((poisoned.y[poisoned.poison_indices] == 0).all())
        (3, True)
    """
    x, y = _as_tensors(data)
    if not x.is_floating_point():
        raise ValueError(f"data must hold floating-point inputs (e.g. images in [0, 1]), got dtype {x.dtype}")
    if x.ndim < 3:
        raise ValueError(
            f"data must hold images (N, H, W) or (N, C, H, W) for the patch trigger, got inputs of shape "
            f"{tuple(x.shape)}; {_TABULAR_HINT}"
        )
    rate = _check_rate(poison_rate)
    seed = check_seed(seed)
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(y.shape)} and dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs have {x.shape[0]} rows but labels {y.shape[0]}")
    if len(y) == 0:
        raise ValueError("the dataset to poison is empty")
    if int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got a minimum of {int(y.min())}")
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if int(y.max()) >= classes:
        raise ValueError(f"labels go up to {int(y.max())} but num_classes={classes}")
    target = _check_class(target_class, classes)
    # checks the patch and the images before anything is drawn
    add_trigger(x[:1], trigger=trigger, size=size, value=value, position=position)
    eligible = torch.nonzero(y != target).flatten() if exclude_target else torch.arange(len(y))
    count = int(round(rate * len(y)))
    if count > len(eligible):
        raise ValueError(
            f"poison_rate={poison_rate!r} asks for {count} poisoned rows but only {len(eligible)} rows are "
            f"eligible{' (labels other than target_class)' if exclude_target else ''}"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]]
    indices = torch.sort(chosen).values.to(torch.long)
    x_out, y_out = x.clone(), y.clone()
    if count:
        x_out[indices] = add_trigger(x[indices], trigger=trigger, size=size, value=value, position=position)
        y_out[indices] = target
    return PoisonedData(x_out, y_out, indices)


class PoisonedDataModule(TensorDataModule):
    """A datamodule whose training split is BadNets-poisoned; validation and test stay clean.

    It wraps another in-memory datamodule, such as
    :class:`~lightning_qsec.data.DigitsDataModule` or
    :class:`~lightning_qsec.data.MNIST5kDataModule` (any
    :class:`~lightning_qsec.data.TensorDataModule`-style module whose ``setup()`` fills
    ``train_dataset``/``val_dataset``/``test_dataset`` with ``TensorDataset(x, y)``).
    Only the training split is poisoned (:func:`poison_dataset`); tensors after ``(x, y)``
    (e.g. groups) are carried through unchanged, in the training and the triggered test
    split. ``poison_indices``
    index rows of that split. :meth:`triggered_test_dataloader` serves the test split
    with the trigger on *every* image and the *true* labels, in the same order as
    :meth:`test_dataloader`, so clean and triggered predictions line up for
    :class:`~lightning_qsec.metrics.AttackSuccessRate` with ``targeted=True`` (which
    leaves out samples whose true label is the target class, as BackdoorBench does).

    Args:
        datamodule: the clean datamodule to wrap.
        poison_rate: fraction of the training rows to poison, in ``[0, 1]``.
        target_class: the attacker's target label.
        seed: seed of the poisoned-row draw; the training loader shuffles with the
            wrapped module's ``seed``.
        trigger, size, value, position: the patch; see :func:`add_trigger`.
        exclude_target: draw poisoned rows only from other classes.

    Attributes:
        poison_indices: after :meth:`setup`, sorted int64 indices of the poisoned training rows.
        train_dataset, val_dataset, test_dataset, triggered_test_dataset: after :meth:`setup`.

    Example:
        >>> from lightning_qsec.data import DigitsDataModule
        >>> dm = PoisonedDataModule(DigitsDataModule(batch_size=32), poison_rate=0.1, target_class=0)
        >>> dm.setup()
        >>> x, y = next(iter(dm.triggered_test_dataloader()))
        >>> tuple(x.shape), float(x[0, 0, -1, -1]), len(dm.poison_indices) > 0
        ((32, 1, 8, 8), 1.0, True)
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        *,
        poison_rate: float,
        target_class: int,
        seed: int = 0,
        trigger: Tensor | None = None,
        size: int = 2,
        value: float = 1.0,
        position: TriggerPosition = "bottom_right",
        exclude_target: bool = True,
    ) -> None:
        if not isinstance(datamodule, pl.LightningDataModule):
            raise ValueError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        # Batches, workers and shuffling follow the wrapped module; `poison_seed` draws the poisoned rows.
        super().__init__(
            batch_size=int(getattr(datamodule, "batch_size", 64)),
            seed=int(getattr(datamodule, "seed", 0)),
            num_workers=int(getattr(datamodule, "num_workers", 0)),
        )
        self.datamodule = datamodule
        self.poison_rate = _check_rate(poison_rate)
        if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)) or target_class < 0:
            raise ValueError(f"target_class must be a non-negative integer class index, got {target_class!r}")
        self.target_class = int(target_class)
        self.poison_seed = check_seed(seed)
        _check_patch(trigger, size, value, position)
        self.trigger, self.size, self.value, self.position = trigger, size, value, position
        self.exclude_target = bool(exclude_target)
        self.triggered_test_dataset: TensorDataset | None = None
        self.poison_indices: Tensor | None = None

    def _split(self, name: str) -> TensorDataset:
        dataset = getattr(self.datamodule, f"{name}_dataset", None)
        if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
            raise ValueError(
                f"{type(self.datamodule).__name__}.setup() must fill {name}_dataset with a TensorDataset(x, y) "
                f"for PoisonedDataModule to wrap it, got {type(dataset).__name__}"
            )
        return dataset

    # -- Lightning hooks ------------------------------------------------------
    def prepare_data(self) -> None:
        """Delegates to the wrapped module."""
        self.datamodule.prepare_data()

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        """Set up the wrapped module, poison its training split and trigger its test split."""
        self.datamodule.setup(None)
        train, val, test = self._split("train"), self._split("val"), self._split("test")
        num_classes = getattr(self.datamodule, "num_classes", None)
        patch = dict(trigger=self.trigger, size=self.size, value=self.value, position=self.position)
        poisoned = poison_dataset(
            train,
            poison_rate=self.poison_rate,
            target_class=self.target_class,
            seed=self.poison_seed,
            num_classes=num_classes,
            exclude_target=self.exclude_target,
            **patch,  # type: ignore[arg-type]
        )
        self.poison_indices = poisoned.poison_indices
        x_test, y_test, *extra_test = test.tensors
        self.triggered_test_dataset = TensorDataset(
            add_trigger(x_test, **patch), y_test.clone(), *extra_test  # type: ignore[arg-type]
        )
        return TensorDataset(poisoned.x, poisoned.y, *train.tensors[2:]), val, test

    def triggered_test_dataloader(self) -> DataLoader[Any]:
        """Batches ``(triggered x, true y)`` of the whole test split, in :meth:`test_dataloader`'s order."""
        self.setup()
        return self._loader(self.triggered_test_dataset, shuffle=False)
