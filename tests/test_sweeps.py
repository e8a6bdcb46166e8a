"""Hydra multirun: one run folder per job, a summary at the end, Optuna, and DDP refused."""

import csv
import json
import sys

from conftest import SMOKE, last_error, run


def sweep(tmp_path, *overrides):
    return run([sys.executable, "-m", "train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMOKE,
                f"data.cache_dir={tmp_path / 'cache'}", *overrides], cwd=tmp_path)


def test_two_job_sweep_with_summary(tmp_path):
    proc = sweep(tmp_path, "logger=tensorboard", "model.lr=1e-3,3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    for job in ("0", "1"):
        assert list((sweep_dir / job / "tensorboard").glob("events.out.tfevents.*"))
        assert (sweep_dir / job / "hf_model" / "model.safetensors").exists()
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert {r["overrides"].split()[-1] for r in rows} == {"model.lr=0.001", "model.lr=0.003"}
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)  # best first
    for r in rows:
        metrics = json.loads((sweep_dir / r["job"] / "metrics.json").read_text())
        assert float(r["val/loss"]) == metrics["after"]["val/loss"]


def test_optuna_sweep(tmp_path):
    proc = sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.lr" in results
    assert len(list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))) == 2


def test_ddp_in_a_sweep_is_refused(tmp_path):
    proc = sweep(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=1,2")
    assert last_error(proc).startswith("error: trainer=ddp cannot run inside a sweep")
