"""A shuffling sampler whose order depends only on ``(seed, epoch)``: resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSeededSampler"]


class EpochSeededSampler(Sampler[int]):
    """Random permutation drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` on a sampler that has it at the start of every
    epoch, so the order of epoch ``k`` is the same in an uninterrupted run and in a
    run resumed from an end-of-epoch checkpoint, and it draws nothing from torch's
    global RNG. (The sampler keeps no position inside an epoch: a mid-epoch resume
    starts that epoch's order again.)

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed.

    Example:
        >>> s = EpochSeededSampler(range(5), seed=0)
        >>> s.set_epoch(1)
        >>> sorted(s)
        [0, 1, 2, 3, 4]
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.num_samples = len(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
