"""Training order and masks as functions of (seed, epoch, example): what exact resume rests on."""

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader

from bert_mlm.masking import MaskingCollator
from bert_mlm.order import EpochShuffle, WithMaskSeeds

EXAMPLES = [{"input_ids": [101, *range(1000 + i, 1060 + i), 102]} for i in range(64)]


def collator() -> MaskingCollator:
    return MaskingCollator(mask_token_id=103, pad_token_id=0, special_token_ids=[0, 100, 101, 102, 103],
                           vocab_size=30522)


def masks_by_example(epoch: int, batch_size: int, num_workers: int, seed: int = 42) -> dict[int, torch.Tensor]:
    sampler = EpochShuffle(len(EXAMPLES), seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(WithMaskSeeds(EXAMPLES, seed), batch_size=batch_size, sampler=sampler,
                        collate_fn=collator(), num_workers=num_workers)
    order = [i for _, i in sampler]
    labels = torch.cat([batch["labels"] for batch in loader])
    return {index: row for index, row in zip(order, labels)}


def test_an_examples_masks_do_not_depend_on_batch_or_workers():
    a = masks_by_example(epoch=0, batch_size=8, num_workers=0)
    b = masks_by_example(epoch=0, batch_size=5, num_workers=2)
    assert a.keys() == b.keys() == set(range(64))
    assert all(torch.equal(a[i], b[i]) for i in a)


def test_each_epoch_has_a_new_order_and_new_masks():
    first, second = EpochShuffle(64, 42), EpochShuffle(64, 42)
    second.set_epoch(1)
    assert [i for _, i in first] != [i for _, i in second]
    assert sorted(i for _, i in second) == list(range(64))
    a, b = masks_by_example(0, 8, 0), masks_by_example(1, 8, 0)
    assert sum(torch.equal(a[i], b[i]) for i in a) < 4


def test_the_seed_decides():
    assert masks_by_example(0, 8, 0, seed=1)[0].tolist() == masks_by_example(0, 8, 0, seed=1)[0].tolist()
    assert not all(torch.equal(masks_by_example(0, 8, 0, seed=1)[i], masks_by_example(0, 8, 0, seed=2)[i])
                   for i in range(64))


@pytest.mark.parametrize("size, world_size", [(64, 1), (10, 4), (3, 8)])
def test_ddp_ranks_get_what_lightnings_sampler_wrapper_would_give_them(size, world_size, monkeypatch):
    # Lightning wraps a sampler that is not a DistributedSampler in this wrapper, which lists
    # every example of the epoch; ours shards itself, and must hand each rank the same order.
    monkeypatch.setattr(EpochShuffle, "CHUNK", 5)  # chunk edges inside the epoch
    for epoch in (0, 3):
        shards = []
        for rank in range(world_size):
            wrapped = DistributedSamplerWrapper(EpochShuffle(size, 42), num_replicas=world_size, rank=rank, shuffle=False)
            ours = EpochShuffle(size, 42, rank=rank, world_size=world_size)
            wrapped.set_epoch(epoch), ours.set_epoch(epoch)
            shards.append(list(ours))
            assert shards[-1] == list(wrapped) and len(ours) == len(wrapped)
        assert {i for shard in shards for _, i in shard} == set(range(size))  # every example, some twice

