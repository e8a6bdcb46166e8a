"""The training order: a seeded shuffle per epoch, each example carrying the seed of its
masks. Data order and masks are then functions of (seed, epoch, position) alone, so a run
resumed mid-epoch (the DataLoader's position restored from the checkpoint) sees exactly
the batches and masks the uninterrupted run would have seen, with any number of workers."""

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


def mask_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (run seed, epoch, example): new masks every epoch."""
    return ((seed * 1_000_003 + epoch) * 0x9E3779B97F4A7C15 + index) % 2**63


class EpochShuffle(DistributedSampler):
    """A random permutation of the examples per epoch (Lightning calls `set_epoch`);
    yields (epoch, index) so the dataset can attach the mask seed.

    Under DDP, rank r of `world_size` takes positions r, r + world_size, ... of the
    permutation, padded from its start to a multiple of world_size: what Lightning's
    DistributedSamplerWrapper would hand each rank. Being a DistributedSampler, it is not
    wrapped, and the wrapper's list of every example of the epoch (about 100 bytes each:
    gigabytes on a large corpus) is never built; here an epoch holds its permutation
    (8 bytes an example) and hands it out a chunk at a time."""

    CHUNK = 65536

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=False, seed=seed)
        self.size = size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        step = self.num_replicas
        for start in range(self.rank, self.total_size, step * self.CHUNK):
            positions = torch.arange(start, min(start + step * self.CHUNK, self.total_size), step) % self.size
            yield from ((self.epoch, i) for i in order[positions].tolist())


class WithMaskSeeds(Dataset):
    """Examples of `dataset`, looked up by (epoch, index), with their `mask_seed`."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int] | int]) -> list[dict]:
        """A batch's examples (the DataLoader asks for them together): from a `datasets`
        Dataset in one look-up rather than one per example. A plain index is epoch 0's:
        what a sampler other than ours gives (trainer.overfit_batches: the same masks each time)."""
        keys = [key if isinstance(key, tuple) else (0, key) for key in keys]
        many = getattr(self.dataset, "__getitems__", None)
        rows = many([index for _, index in keys]) if many else [self.dataset[index] for _, index in keys]
        return [{**row, "mask_seed": mask_seed(self.seed, epoch, index)} for row, (epoch, index) in zip(rows, keys)]
