"""`python -m train` end to end, as a user runs it."""

import json
import math

import torch
from transformers import pipeline

from conftest import SMOKE, run_train


def test_smoke_run_leaves_a_complete_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SMOKE, "logger=tensorboard", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"before", "after", "train/tokens_per_sec", "steps", "wall_s", "world_size"}
    assert metrics["steps"] == 10 and metrics["world_size"] == 1
    assert metrics["train/tokens_per_sec"] > 0 and metrics["wall_s"] > 0
    before, after = metrics["before"], metrics["after"]
    assert math.isfinite(after["val/loss"]) and after["val/loss"] < before["val/loss"]
    assert math.isclose(after["val/ppl"], math.exp(after["val/loss"]), rel_tol=1e-4)
    assert 0 <= after["val/acc"] <= 1
    assert "val/ppl" in proc.stdout and "before" in proc.stdout and "after" in proc.stdout

    fill = pipeline("fill-mask", model=str(run_dir / "hf_model"), device="cpu")
    predictions = fill("The [MASK] statement is used to define a function.")
    assert len(predictions) == 5 and all(0 <= p["score"] <= 1 for p in predictions)

    from bert_mlm import MLMModule

    module = MLMModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    exported = pipeline("fill-mask", model=str(run_dir / "hf_model")).model
    assert torch.equal(
        module.model.bert.embeddings.word_embeddings.weight,
        exported.bert.embeddings.word_embeddings.weight,
    )
