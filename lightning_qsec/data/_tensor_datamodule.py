"""Shared base of the in-memory datamodules: seeded stratified splits and dataloaders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec._validation import check_int, check_seed
from lightning_qsec.data.sampler import EpochSeededSampler

__all__ = ["TensorDataModule", "stratified_split"]


def check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """``value``, or a ValueError naming the argument and the allowed values."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {choices}")
    return value


def stratified_split(strata: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded stratified split of the indices ``0..N-1``.

    Each part ``k`` gets ``round(fractions[k] * N)`` indices in total, shared out
    among the strata in proportion to their sizes (largest remainders first, ties
    broken at random); the first returned part holds all the indices left over.

    Args:
        strata: one stratum label per row, shape ``(N,)`` (class labels, or class
            and group combined).
        fractions: the fraction of the rows for each part after the first.
        seed: seed of the NumPy generator that draws the split.

    Returns:
        ``len(fractions) + 1`` sorted, disjoint int64 index arrays whose union is
        ``0..N-1``: the remainder first, then one array per fraction.
    """
    strata = np.asarray(strata)
    n = len(strata)
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(strata, return_inverse=True)
    inverse = inverse.reshape(-1)
    num_strata = int(inverse.max()) + 1 if n else 0
    members = [rng.permutation(np.flatnonzero(inverse == s)) for s in range(num_strata)]
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    taken = np.zeros_like(sizes)
    counts: list[np.ndarray] = []
    for fraction in fractions:
        target = min(int(round(fraction * n)), int((sizes - taken).sum()))
        ideal = sizes * fraction
        count = np.minimum(np.floor(ideal).astype(np.int64), sizes - taken)
        rest = target - int(count.sum())
        order = np.lexsort((rng.random(num_strata), -(ideal - np.floor(ideal))))
        while rest > 0:
            for s in order:
                if rest == 0:
                    break
                if taken[s] + count[s] < sizes[s]:
                    count[s] += 1
                    rest -= 1
        taken += count
        counts.append(count)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for s, perm in enumerate(members):
        start = 0
        for k, count in enumerate(counts):
            parts[k + 1].append(perm[start : start + count[s]])
            start += int(count[s])
        parts[0].append(perm[start:])
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, dtype=np.int64)
        for p in parts
    ]


class TensorDataModule(pl.LightningDataModule):
    """Base of datamodules that hold their train/val/test splits as in-memory tensors.

    Subclasses implement :meth:`_build`, which returns the three
    :class:`~torch.utils.data.TensorDataset` splits; :meth:`setup` calls it once,
    whatever the stage, so every dataloader works in every stage. The training
    loader shuffles with an :class:`~lightning_qsec.data.sampler.EpochSeededSampler`:
    the order of each epoch depends only on ``seed`` and the epoch, so a run resumed
    from an end-of-epoch checkpoint sees the same batches as an uninterrupted one (a
    checkpoint saved mid-epoch resumes with that epoch's order from its start: the
    loader keeps no position).

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0`` or a ``seed`` that is not an
            integer ``>= 0``.

    Args:
        batch_size: rows per batch, ``>= 1``.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: worker processes of each dataloader.

    Attributes:
        split_indices: after :meth:`setup`, the row indices of each split
            (``"train"``, ``"val"``, ``"test"``) in the source it was drawn from.
    """

    def __init__(self, *, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.num_workers = check_int(num_workers, "num_workers", minimum=0)
        self.seed = check_seed(seed, non_negative=True)  # NumPy's split generator needs >= 0
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.split_indices: dict[str, np.ndarray] = {}
        self._num_classes: int | None = None
        self._input_shape: tuple[int, ...] | None = None

    # -- to implement -------------------------------------------------------
    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        """Load the data and return the train, val and test datasets."""
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to do: every source is read from local files."""

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits (once), whatever ``stage`` is."""
        if self.train_dataset is not None:
            return
        train, val, test = self._build()
        for name, ds in (("train", train), ("val", val), ("test", test)):
            if len(ds) == 0:
                raise ValueError(
                    f"{type(self).__name__}: the {name} split is empty; change the split "
                    "fractions or limits"
                )
        self.train_dataset, self.val_dataset, self.test_dataset = train, val, test
        if self._num_classes is None:
            labels = torch.cat([train.tensors[1], val.tensors[1], test.tensors[1]])
            self._num_classes = int(labels.max().item()) + 1
        if self._input_shape is None:
            self._input_shape = tuple(train.tensors[0].shape[1:])

    def _loader(self, dataset: TensorDataset | None, *, shuffle: bool) -> DataLoader[Any]:
        assert dataset is not None, "setup() builds every split"
        sampler = EpochSeededSampler(dataset, self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled (seeded) batches of the training split."""
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """Batches of the validation split, in order."""
        self.setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        """Batches of the test split, in order."""
        self.setup()
        return self._loader(self.test_dataset, shuffle=False)

    # -- shape information --------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes (loads the data if that is needed to know it)."""
        if self._num_classes is None:
            self.setup()
        assert self._num_classes is not None
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension (loads the data if needed)."""
        if self._input_shape is None:
            self.setup()
        assert self._input_shape is not None
        return self._input_shape

    # -- helpers for subclasses ---------------------------------------------
    @staticmethod
    def _subset(*tensors: torch.Tensor, index: np.ndarray) -> TensorDataset:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TensorDataset(*(t[idx] for t in tensors))


def split_images(
    dm: TensorDataModule,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Stratified, seeded train/val/test split of images already scaled to ``[0, 1]``.

    Records the indices in ``dm.split_indices`` and returns the three datasets of
    ``(float32 images, int64 labels)``.
    """
    train, val, test = stratified_split(labels, [val_fraction, test_fraction], dm.seed)
    dm.split_indices = {"train": train, "val": val, "test": test}
    x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return (
        dm._subset(x, y, index=train),
        dm._subset(x, y, index=val),
        dm._subset(x, y, index=test),
    )
