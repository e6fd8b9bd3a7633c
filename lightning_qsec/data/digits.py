"""scikit-learn's 8x8 digits (1,797 images, 10 classes): the project's default data."""

from __future__ import annotations

import numpy as np
from torch.utils.data import TensorDataset

from lightning_qsec._validation import check_probability

from ._tensor_datamodule import TensorDataModule, split_images

__all__ = ["DigitsDataModule"]


class DigitsDataModule(TensorDataModule):
    """The 8x8 handwritten digits of :func:`sklearn.datasets.load_digits` (offline).

    Batches are ``(x, y)``: ``x`` float32 of shape ``(B, 1, 8, 8)`` in ``[0, 1]``
    (pixel values 0..16 divided by 16), ``y`` int64 labels 0..9. The split is
    stratified by class and seeded.

    Args:
        batch_size: rows per batch.
        val_fraction: fraction of the 1,797 images for validation, in ``(0, 1)``.
        test_fraction: fraction for testing, in ``(0, 1)``.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: dataloader worker processes.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes, dm.input_shape
        ((32, 1, 8, 8), 10, (1, 8, 8))
    """

    def __init__(
        self,
        *,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.val_fraction = check_probability(val_fraction, "val_fraction")
        self.test_fraction = check_probability(test_fraction, "test_fraction")
        check_probability(self.val_fraction + self.test_fraction, "val_fraction + test_fraction")
        self._num_classes = 10
        self._input_shape = (1, 8, 8)
        self.save_hyperparameters()

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images.astype(np.float32)[:, None] / 16.0
        return split_images(
            self,
            images,
            bunch.target,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
        )
