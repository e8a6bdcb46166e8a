"""Hydra multirun: one run folder per job, jobs side by side, a summary at the end, Optuna, and
DDP refused."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from bert_mlm.errors import UserError
from bert_mlm.parallel import SideBySide, claim_slot, cores_for, device_for
from bert_mlm.sweep import table
from bert_mlm.workers import available_cores
from conftest import CONF, OFFLINE, SMOKE, last_error, run, run_train_here, saved_step, wait_for


def sweep(tmp_path, *overrides):
    return run([sys.executable, "-m", "train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMOKE,
                f"data.cache_dir={tmp_path / 'cache'}", *overrides], cwd=tmp_path)


def log_span(log: str) -> tuple[datetime, ...]:
    """The first and last time in a train.log: the job's start and its last checkpoint."""
    stamps = re.findall(r"^\[([\d-]+ [\d:,]+)\]", log, re.M)
    return tuple(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (stamps[0], stamps[-1]))


def test_two_jobs_at_once_with_summary(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "logger=tensorboard",
                 "model.lr=1e-3,3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    threads = max(1, available_cores() // 2)  # the cores shared between the two jobs
    pids, spans = set(), []
    for job in ("0", "1"):
        events = list((sweep_dir / job / "tensorboard").glob("events.out.tfevents.*"))
        assert any(b"hparams" in f.read_bytes() for f in events)  # TensorBoard's HPARAMS compares the jobs
        assert (sweep_dir / job / "hf_model" / "model.safetensors").exists()
        log = (sweep_dir / job / "train.log").read_text()
        pids |= set(re.findall(rf"job {job}: torch threads {threads}, 2 jobs at once on \d+ cores \(pid (\d+)\)", log))
        spans.append(log_span(log))
    assert len(pids) == 2  # each job in a process of its own, ...
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # ... both running at once
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert {r["overrides"].split()[-1] for r in rows} == {"model.lr=0.001", "model.lr=0.003"}
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)  # best first
    for r in rows:
        metrics = json.loads((sweep_dir / r["job"] / "metrics.json").read_text())
        assert float(r["val/loss"]) == metrics["after"]["val/loss"]
    # The same table on the console, best first.
    printed = proc.stdout[proc.stdout.index("sweep of 2 jobs, best val/loss first"):].splitlines()[1:4]
    assert printed[0].split()[:3] == ["job", "val/loss", "val/ppl"]
    for line, r in zip(printed[1:], rows):
        assert line.split()[:2] == [r["job"], f"{float(r['val/loss']):.4f}"] and line.endswith(r["overrides"])


def test_summary_table_shows_failed_and_untimed_jobs():
    done = {"job": "0", "overrides": "model.lr=0.001", "val/loss": 6.5, "val/ppl": 665.1, "val/acc": 0.1,
            "steps": 2, "tokens_per_sec": None, "status": "done"}  # too few steps to time
    failed = {**done, "job": "1", "overrides": "model.lr=9", "status": "failed",
              **dict.fromkeys(("val/loss", "val/ppl", "val/acc", "steps", "tokens_per_sec"), "")}
    header, first, second = table([done, failed]).splitlines()
    assert header.split() == ["job", "val/loss", "val/ppl", "val/acc", "steps", "tokens/s", "overrides"]
    assert first.split() == ["0", "6.5000", "665.1", "0.1000", "2", "model.lr=0.001"]
    assert second.split() == ["1", "model.lr=9", "(failed)"]
    assert len({len(line) - len(line.lstrip()) for line in (first, second)}) == 1  # the job column aligned


def test_optuna_sweep(tmp_path):
    proc = sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.lr" in results
    assert len(list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))) == 2


def test_an_optuna_search_goes_on_past_failed_trials(tmp_path):
    # Every trial's max_length is above model=tiny's 512 positions: each is refused as it builds.
    proc = sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none",
                 "data.max_length=choice(1024,2048)")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 jobs failed")
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "error: data.max_length=" in (tmp_path / "sweep" / "0" / "train.log").read_text()  # the reason, kept


class StopAtStep4(L.Callback):
    """SIGTERM, as SLURM sends it, at step 4 (after step 4 of a resumed run: never again)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 4:
            signal.raise_signal(signal.SIGTERM)


def stop_group(pgid: int, signum: int) -> bool:
    """Sends `signum` (0: none) to a process group: whether any of its processes is left."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False


class SlowAfterStep2(L.Callback):
    """Marks step 2 in the run folder (`step2`), and trains slowly enough to be stopped halfway."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            (Path(trainer.default_root_dir) / "step2").touch()
        time.sleep(0.2)


class SlowSaveAfterStep2(SlowAfterStep2):
    def on_save_checkpoint(self, trainer, *args):
        if trainer.received_sigterm:  # the stop's save: time for a second Ctrl-C
            (Path(trainer.default_root_dir) / "saving").touch()
            time.sleep(30)


@pytest.mark.parametrize("stop", ["ctrl-c", "ctrl-c-twice", "sigterm-to-the-sweep", "sigterm-to-one-job",
                                  "kill-9-to-the-sweep", "kill-9-to-one-job"])
def test_jobs_side_by_side_save_when_the_sweep_is_stopped_and_it_finishes_them(tmp_path, stop):
    """joblib's pool used to end its workers unsaved. Ctrl-C reaches every process; a SIGTERM
    only the sweep's own, or one job's (which then stops the sweep, as one job at a time would).
    Killed, the sweep's process says nothing, but its workers still save and end. A second
    Ctrl-C ends it all at once, and says how to finish the sweep."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
               f"hydra.sweep.dir={sweep_dir}", *SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=40",
               "model.lr=1e-3,2e-3,3e-3",
               f"+callbacks.slow._target_=test_sweeps.{'SlowSave' if stop == 'ctrl-c-twice' else 'Slow'}AfterStep2"]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    with (tmp_path / "out").open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        try:
            for job in ("0", "1"):
                wait_for(sweep_dir / job / "step2", proc)
            if stop.startswith("ctrl-c"):
                os.killpg(proc.pid, signal.SIGINT)
                if stop == "ctrl-c-twice":
                    for job in ("0", "1"):
                        wait_for(sweep_dir / job / "saving", proc)
                    os.killpg(proc.pid, signal.SIGINT)
            elif stop.endswith("-to-the-sweep"):
                os.kill(proc.pid, signal.SIGKILL if stop.startswith("kill-9") else signal.SIGTERM)
            else:
                pid = re.search(r"\(pid (\d+)\)", (sweep_dir / "1" / "train.log").read_text())[1]
                os.kill(int(pid), signal.SIGKILL if stop.startswith("kill-9") else signal.SIGTERM)
            statuses = {"kill-9-to-the-sweep": -9, "kill-9-to-one-job": 1, "ctrl-c": 130, "ctrl-c-twice": 130}
            assert proc.wait(timeout=120) == statuses.get(stop, 143)
            deadline = time.monotonic() + 120
            while stop_group(proc.pid, 0):  # the workers end by themselves
                assert time.monotonic() < deadline
                time.sleep(0.5)
        finally:
            stop_group(proc.pid, signal.SIGKILL)
    out = (tmp_path / "out").read_text()
    if stop == "ctrl-c-twice":
        assert out.strip().splitlines()[-1].startswith("sweep ended at once by a second Ctrl-C, not waiting"), out[-3000:]
        assert f"ckpt_path=last hydra.sweep.dir={sweep_dir}" in out.strip().splitlines()[-1]
        assert "Traceback" not in out and "leaked" not in out and not (sweep_dir / "2").exists(), out[-3000:]
        return  # unsaved
    if stop == "kill-9-to-one-job":  # the other job saves before loky ends the pool
        assert out.strip().splitlines()[-1].startswith("error: a worker process of the sweep died"), out[-3000:]
        assert "the other running jobs stopped and saved last.ckpt; finish the whole sweep" in out, out[-3000:]
    elif stop != "kill-9-to-the-sweep":
        assert out.strip().splitlines()[-1].startswith("sweep stopped by "), out[-3000:]  # the last word
        assert "once its running jobs had stopped" in out, out[-3000:]
    if stop != "kill-9-to-the-sweep":  # (killed, it leaves loky's resource tracker to clean up after it)
        assert "leaked" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for job in ("0", "1") if stop != "kill-9-to-one-job" else ("0",):
        assert 2 <= saved_step(sweep_dir / job / "checkpoints" / "last.ckpt") < 40
        assert not (sweep_dir / job / "metrics.json").exists()
    assert not (sweep_dir / "2").exists()  # not started: the workers took no new job
    if stop != "ctrl-c":
        return  # (finishing it: once is enough)
    finished = run([*command, "ckpt_path=last"], cwd=tmp_path, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [(row["status"], row["steps"]) for row in rows] == [("done", "40")] * 3


def test_a_stopped_optuna_trial_resumes_as_a_run_with_the_command_it_printed(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train_here(None, "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1",
                          f"hydra.sweep.dir={sweep_dir}", "+callbacks.stop._target_=test_sweeps.StopAtStep4", *SMOKE,
                          f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=8")
    assert proc.returncode == 143, proc.stderr[-3000:]
    printed = shlex.split(proc.stderr.split("Resume with:\n")[1].splitlines()[0])
    assert printed[:3] == ["python", "-m", "train"]
    resumed = run_train_here(None, *printed[3:])  # not a new search: the trial, to its end
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["steps"] == 8
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0"]


def test_a_stopped_sweep_is_finished_by_its_command_with_ckpt_path_last(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["-m", "model.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep_dir}", *SMOKE, "trainer.max_steps=8",
               f"data.cache_dir={tmp_path / 'cache'}"]
    proc = run_train_here(None, *command, "+callbacks.stop._target_=test_sweeps.StopAtStep4")
    assert proc.returncode == 143 and "or finish the whole sweep: its command again with ckpt_path=last" in proc.stderr
    assert not (sweep_dir / "1").exists()  # the sweep stopped in job 0
    for _ in range(2):  # job 0 resumes, job 1 starts; then both stand as they are
        proc = run_train_here(None, *command, "ckpt_path=last")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
        assert [(row["status"], row["steps"]) for row in rows] == [("done", "8"), ("done", "8")]
    # Resumed with other data settings: each job is refused, and keeps the record of its run.
    records = {p: p.read_bytes() for p in sweep_dir.glob("*/.hydra/*.yaml")}
    proc = run_train_here(None, *command, "ckpt_path=last", "data.mlm_probability=0.2")
    assert last_error(proc) == "error: 2 of 2 jobs failed: their error lines are above, their logs in their folders"
    assert {p: p.read_bytes() for p in sweep_dir.glob("*/.hydra/*.yaml")} == records
    assert not list(sweep_dir.glob("*/.hydra-new"))
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["status"] for row in rows] == ["failed", "failed"]


def test_an_optuna_search_without_validation_is_refused_up_front(tmp_path):
    line = last_error(run_train_here(None, "-m", "hparams_search=optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                     *SMOKE, "trainer.limit_val_batches=0"))
    assert line.endswith("minimises the final val/loss: validation cannot be off (trainer.limit_val_batches=0)")
    assert not (tmp_path / "sweep" / "0").exists()


def test_a_failing_job_fails_alone(tmp_path):
    proc = sweep(tmp_path, "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2", "model.lr=-1,0.001")
    assert proc.returncode == 1 and "error: model.lr=-1" in proc.stderr and "Traceback" not in proc.stderr
    assert last_error(proc) == "error: 1 of 2 jobs failed: their error lines are above, their logs in their folders"
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [(r["overrides"].split()[-1], r["status"]) for r in rows] == [("model.lr=0.001", "done"),
                                                                          ("model.lr=-1", "failed")]


def test_ddp_in_a_sweep_is_refused(tmp_path):
    proc = sweep(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=1,2")
    assert last_error(proc).startswith("error: trainer=ddp cannot run inside a sweep")


def test_each_worker_claims_a_gpu_of_its_own(tmp_path, monkeypatch):
    """The GPU pick of hydra/launcher=parallel, on the CPU: the launcher's two worker processes
    are played by two claims, GPUs by CUDA_VISIBLE_DEVICES (not run on GPUs)."""
    first, second = claim_slot(tmp_path, 2), claim_slot(tmp_path, 2)
    assert (first[0], second[0]) == (0, 1)
    with pytest.raises(UserError):
        claim_slot(tmp_path, 2)
    first[1].close()  # that worker ended: its GPU is free again
    assert claim_slot(tmp_path, 2)[0] == 0
    assert device_for(1, "GPU-a, GPU-b") == "GPU-b" and device_for(1, None) == "1"

    with initialize_config_dir(str(CONF), version_base="1.3"):
        config = compose("train", overrides=["trainer=gpu", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                                             "hydra.job.num=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         return_hydra_config=True)
    held = []  # the locks of the workers still running
    pinned = []  # each worker's share of a 5-core machine (not this process's: recorded only)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(list(cores)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    def job_in_a_new_worker() -> str:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")  # what each worker inherits
        monkeypatch.setattr(SideBySide, "_slot", None)  # a new process: no GPU yet
        SideBySide().on_job_start(config)
        held.append(SideBySide._slot)
        return os.environ["CUDA_VISIBLE_DEVICES"]

    assert (job_in_a_new_worker(), job_in_a_new_worker()) == ("4", "7")
    SideBySide().on_job_start(config)  # the second worker's next job: the GPU it has
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert pinned == [[0, 1], [2, 3]]  # its DataLoader workers are sized for 2 cores, not 5
    assert cores_for(2, 4, [0, 1]) == [1]  # more jobs than cores: one core each, shared


def test_more_jobs_at_once_than_gpus_is_refused(tmp_path):
    n = max(2, torch.cuda.device_count() + 1)
    proc = run_train_here(tmp_path / "unused", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMOKE, "trainer=gpu",
                          "hydra/launcher=parallel", f"hydra.launcher.n_jobs={n}", "seed=1,2")
    assert last_error(proc).startswith(f"error: hydra.launcher.n_jobs={n} runs {n} jobs at once, one GPU each, but")


def test_jobs_side_by_side_with_a_joblib_it_was_not_made_for_are_refused(tmp_path, monkeypatch):
    import joblib

    monkeypatch.setattr(joblib, "__version__", "1.4.2")  # its LokyBackend takes no initializer
    proc = run_train_here(tmp_path / "unused", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMOKE,
                          "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "seed=1,2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: hydra/launcher=parallel needs joblib 1.5 or 1.6, not 1.4.2: pip install -e ".[parallel]"']
    assert not any((tmp_path / "sweep").glob("*/.hydra"))  # no job started


def test_output_dir_in_a_sweep_is_a_folder_per_job_or_refused(tmp_path):
    args = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMOKE, f"data.cache_dir={tmp_path / 'cache'}",
            "trainer.max_steps=2"]
    # One folder for every job: each would train over the one before (and did).
    line = last_error(run_train_here(None, *args, f"output_dir={tmp_path / 'one'}", "seed=1,2"))
    assert line == (f"error: output_dir={tmp_path / 'one'} would be the run folder of every job of the sweep: "
                    "leave it out (job N goes to hydra.sweep.dir/N)")
    assert not (tmp_path / "one").exists() and not (tmp_path / "sweep").exists()
    # A folder of its own per job: the summary reads each job's metrics there.
    swept = f"output_dir={tmp_path / 'a'},{tmp_path / 'b'}"
    proc = run_train_here(None, *args, swept)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert {r["val/loss"] for r in rows} == {str(json.loads((tmp_path / d / "metrics.json").read_text())["after"]
                                                 ["val/loss"]) for d in "ab"}
    # The same sweep again: a folder that holds a run is refused, as for a single run, and kept.
    kept = (tmp_path / "a" / "checkpoints" / "last.ckpt").read_bytes()
    proc = run_train_here(None, *args, swept, "seed=3")
    assert proc.returncode == 1 and f"error: {tmp_path / 'a'} already holds a run" in proc.stderr
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").read_bytes() == kept


def test_the_summary_lists_failed_jobs_in_job_order(tmp_path):
    from bert_mlm.sweep import summarize

    for job in ("10", "2", "1"):  # three failed jobs: no metrics.json to sort them by
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text("output_dir: ${hydra:runtime.output_dir}\n")
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- model.lr={job}e-4\n")
    assert [row["job"] for row in summarize(tmp_path)] == ["1", "2", "10"]
    # Job 2 holds the metrics.json of an earlier run: not this sweep's, so not its result.
    (tmp_path / "2" / "metrics.json").write_text(json.dumps({"after": {"val/loss": 5.0}, "steps": 4}))
    os.utime(tmp_path / "2" / "metrics.json", (1e9, 1e9))
    assert [row["status"] for row in summarize(tmp_path, since=time.time() - 60)] == ["failed"] * 3
