"""The training order: a seeded shuffle per epoch, each example carrying the seed of its
masks. Data order and masks are then functions of (seed, epoch, position) alone, so a run
resumed mid-epoch (the DataLoader's position restored from the checkpoint) sees exactly
the batches and masks the uninterrupted run would have seen, with any number of workers."""

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def mask_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (run seed, epoch, example): new masks every epoch."""
    return ((seed * 1_000_003 + epoch) * 0x9E3779B97F4A7C15 + index) % 2**63


class EpochShuffle(Sampler):
    """A random permutation of the examples per epoch (Lightning calls `set_epoch`);
    yields (epoch, index) so the dataset can attach the mask seed."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return ((self.epoch, i) for i in order.tolist())


class WithMaskSeeds(Dataset):
    """Examples of `dataset`, looked up by (epoch, index), with their `mask_seed`."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        return {**self.dataset[index], "mask_seed": mask_seed(self.seed, epoch, index)}
