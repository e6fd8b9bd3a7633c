"""Fashion-MNIST (60,000 + 10,000 images) read from local IDX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_qsec._validation import check_int, check_probability

from ._tensor_datamodule import TensorDataModule, stratified_split
from .idx import read_idx

__all__ = ["DEFAULT_FASHION_MNIST_ROOT", "FashionMNISTDataModule"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the files."""

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found: neither {root / name} nor "
        f"{root / (name + '.gz')} exists. Either pass root= a directory holding "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or install the Debian package: "
        f"`apt-get install dataset-fashion-mnist` (installs to {DEFAULT_FASHION_MNIST_ROOT})"
    )


class FashionMNISTDataModule(TensorDataModule):
    """Fashion-MNIST from the standard IDX files, read offline.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (gzipped ``.gz`` or
    plain) from ``root``. The official ``t10k`` files are the test split; the
    validation split is drawn (stratified, seeded) from the official training
    files. Batches are ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` in ``[0, 1]``,
    ``y`` int64 labels 0..9 (names in :attr:`class_names`).

    Args:
        root: directory of the IDX files; by default
            ``/usr/share/datasets/fashion-mnist`` (Debian package
            ``dataset-fashion-mnist``).
        batch_size: rows per batch.
        val_fraction: fraction of the (possibly limited) training images held
            out for validation, in ``(0, 1)``.
        limit_train: if given, use only this many images of the official training
            files (a stratified, seeded subset), before the validation split.
        limit_test: if given, use only this many test images (stratified, seeded).
        seed: seed of the splits and of the training loader's shuffling.
        num_workers: dataloader worker processes.

    Raises:
        FileNotFoundError: from :meth:`setup`, naming the missing file and how to
            get it.
    """

    class_names: list[str] = CLASS_NAMES

    def __init__(
        self,
        *,
        root: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        limit_train: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.root = root
        self.val_fraction = check_probability(val_fraction, "val_fraction")
        self.limit_train = None if limit_train is None else check_int(limit_train, "limit_train", minimum=2)
        self.limit_test = None if limit_test is None else check_int(limit_test, "limit_test", minimum=1)
        self._num_classes = 10
        self._input_shape = (1, 28, 28)
        self.save_hyperparameters()

    @property
    def data_dir(self) -> Path:
        """The directory the files are read from."""
        return Path(self.root if self.root is not None else DEFAULT_FASHION_MNIST_ROOT).expanduser()

    def _read_split(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images_path = _find(self.data_dir, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(self.data_dir, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_path} / {labels_path}: expected images (N, 28, 28) and labels (N,), "
                f"got {images.shape} and {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{labels_path}: labels must be the 10 classes 0..9, got {labels.min()}..{labels.max()}")
        return images, labels.astype(np.int64)

    @staticmethod
    def _limit(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
        if limit is None or limit >= len(labels):
            return np.arange(len(labels))
        return stratified_split(labels, [limit / len(labels)], seed)[1]

    @staticmethod
    def _tensors(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> TensorDataset:
        x = torch.from_numpy(images[index].astype(np.float32) / 255.0).unsqueeze(1)
        return TensorDataset(x, torch.from_numpy(labels[index]))

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        train_images, train_labels = self._read_split("train")
        test_images, test_labels = self._read_split("t10k")
        pool = self._limit(train_labels, self.limit_train, self.seed)
        rest, val = stratified_split(train_labels[pool], [self.val_fraction], self.seed + 1)
        train, val = pool[rest], pool[val]
        test = self._limit(test_labels, self.limit_test, self.seed + 2)
        self.split_indices = {"train": train, "val": val, "test": test}
        return (
            self._tensors(train_images, train_labels, train),
            self._tensors(train_images, train_labels, val),
            self._tensors(test_images, test_labels, test),
        )
