"""Wrong values across the whole config: every key refuses them at the start, in one
`error:` line that names it, and nothing is built or written."""

import pytest
import torch
from omegaconf import OmegaConf

from bert_mlm.checks import check_config
from bert_mlm.errors import UserError
from conftest import CONF, ROOT, SMOKE, last_error, run_train_here

# Values the walk would try that these keys take, and why.
ALLOWED = {
    "seed": {0},  # any seed in 0 .. 2**32 - 1
    "model.warmup_steps": {0},  # no warm-up
    "data.num_workers": {0},  # load in the training process
    "trainer.max_steps": {0, -1},  # 0: only the validations before and after; -1: train by max_epochs
    "trainer.max_epochs": {0},
    "trainer.num_sanity_val_steps": {-1},  # the whole validation set
    "trainer.devices": {-1},  # all visible devices
    "callbacks.checkpoint.save_top_k": {0, -1},  # keep none / all
    "callbacks.progress.refresh_rate": {0},  # no bar
    "callbacks.last.every_minutes": {0},  # by steps only
    # Sizes, not shares: 1.5 is as good as 0.5.
    "model.lr": {1.5}, "model.weight_decay": {1.5}, "model.eps": {1.5}, "trainer.gradient_clip_val": {1.5},
}


def wrong_values(value, missing: str) -> list:
    """Values of the wrong type or range for a key set to `value`."""
    if isinstance(value, bool):
        return ["maybe"]
    if isinstance(value, int):
        return [0, -1, "many"]
    if isinstance(value, float):
        return [-1.0, "many", *([1.5] if 0 <= value <= 1 else [])]  # a share: above 1
    if isinstance(value, str) and value.endswith((".txt", ".ckpt")):  # a path to a file
        return [missing]
    if isinstance(value, list) and value:
        return [[wrong, *value[1:]] for wrong in wrong_values(value[0], missing)]
    return []  # other strings (names) and null: Lightning's or the hub's to judge


def leaves(node: dict, path: str = ""):
    for key, value in node.items():
        if key == "_target_":
            continue
        if isinstance(value, dict):
            yield from leaves(value, f"{path}{key}.")
        else:
            yield f"{path}{key}", value


@pytest.fixture
def walk_cfg(cfg_of, tmp_path):
    """The smoke config with its nulls set, so that the walk tries their types too."""
    text = tmp_path / "text.txt"
    text.write_text("some text\n")
    (tmp_path / "run.ckpt").write_bytes(b"")  # read only when training starts
    return cfg_of(
        *SMOKE, "data=text", f"data.train_files=[{text}]", f"data.val_files=[{text}]", f"ckpt_path={tmp_path}/run.ckpt",
        "trainer.check_val_every_n_epoch=1", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
        "trainer.deterministic=false", "trainer.benchmark=false", "trainer.enable_progress_bar=true",
        "trainer.enable_model_summary=true", "callbacks.throughput.peak_tflops=100.0",
    )


def test_every_config_file_passes(cfg_of, monkeypatch):
    # As on a machine with GPUs (the trainer configs for them are checked against what is visible).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    for path in sorted(CONF.rglob("*/*.yaml")):
        group = f"{path.parent.relative_to(CONF)}={path.stem}"
        needs_files = group in ("data=text", "experiment=scratch-wikitext")
        check_config(cfg_of(group, *([f"data.train_files=[{ROOT / 'pyproject.toml'}]"] if needs_files else [])))


def test_every_key_refuses_wrong_values(walk_cfg, tmp_path):
    cfg = walk_cfg
    check_config(cfg)  # the config itself is fine
    accepted, tried = [], set()
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=True)):
        for wrong in wrong_values(value, str(tmp_path / "missing.txt")):
            if wrong == value and type(wrong) is type(value) or wrong in ALLOWED.get(key, ()):
                continue
            tried.add(key)
            OmegaConf.update(cfg, key, wrong, merge=False)
            try:
                check_config(cfg)
                accepted.append(f"{key}={wrong}")
            except UserError as err:
                assert str(err).startswith(f"{key}="), (key, wrong, str(err))
            finally:
                OmegaConf.update(cfg, key, value, merge=False)
    assert not accepted, f"accepted: {accepted}"
    assert {"seed", "ckpt_path", "tokenizer.vocab_size", "model.lr", "model.betas", "data.batch_size",
            "data.train_files", "data.mlm_probability", "trainer.devices", "trainer.limit_val_batches",
            "callbacks.probes.top_k"} <= tried


@pytest.mark.parametrize("override", [
    "trainer.accumulate_grad_batches=0",
    "model.dropout=1.5",
    "callbacks.probes.top_k=many",
    "data.val_files=[{tmp}/missing.txt]",
])
def test_wrong_value_end_to_end(tmp_path, override):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier work")
    proc = run_train_here(run_dir, *SMOKE, override.format(tmp=tmp_path))
    assert last_error(proc).startswith(f"error: {override.split('=')[0]}="), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]
    assert (run_dir / "keep.txt").read_text() == "earlier work"
