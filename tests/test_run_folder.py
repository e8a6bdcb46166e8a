"""A run folder holding an earlier run is never overwritten by accident."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, read_write

from bert_mlm.preflight import Preflight
from bert_mlm.run_folder import holds_run
from conftest import CONF, SMOKE, last_error, run_train_here


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_in_a_folder_is_refused_unless_asked(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_train_here(run_dir, *args).returncode == 0
    before = snapshot(run_dir)

    proc = run_train_here(run_dir, *args, "model.lr=1e-4")
    line = last_error(proc)
    assert "already holds a run" in line and "ckpt_path=last" in line and "overwrite=true" in line, line
    assert "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before  # its .hydra/ config record included
    # Another run's checkpoint starts a new run: it must not replace this one either.
    other = tmp_path / "other.ckpt"
    other.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    proc = run_train_here(run_dir, *args, f"ckpt_path={other}", "trainer.max_steps=20")
    assert "already holds a run" in last_error(proc) and snapshot(run_dir) == before
    # The same folder given as output_dir, Hydra's own files going elsewhere: refused the same.
    proc = run_train_here(tmp_path / "elsewhere", *args, f"output_dir={run_dir}")
    assert "already holds a run" in last_error(proc) and snapshot(run_dir) == before

    # Resuming it with a bad value: refused before Hydra rewrites its .hydra/ record. With other
    # data settings, refused after (the checkpoint is read then), its record put back.
    proc = run_train_here(run_dir, *args, "ckpt_path=last", "model.lr=-1")
    assert last_error(proc).startswith("error: model.lr=-1") and snapshot(run_dir) == before
    proc = run_train_here(run_dir, *args, "ckpt_path=last", "data.batch_size=4", "trainer.max_steps=20")
    assert "trained with data.batch_size=" in last_error(proc)

    def all_but_the_log(files: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in files.items() if k != "train.log"}

    assert all_but_the_log(snapshot(run_dir)) == all_but_the_log(before)

    # Replacing it with settings or data that are then refused: it loses nothing (but lines in train.log).
    outputs = all_but_the_log

    blank = tmp_path / "blank.txt"
    blank.write_text(" \n" * 10)
    proc = run_train_here(run_dir, *args, "overwrite=true", "data=text", f"data.train_files=[{blank}]")
    assert "holds no text" in last_error(proc) and outputs(snapshot(run_dir)) == outputs(before)
    # Preparing data for it (prepare_only) writes nothing there: not refused, nothing cleared.
    recorded = snapshot(run_dir)
    assert run_train_here(run_dir, *args, "prepare_only=true", "data.max_length=32").returncode == 0
    assert snapshot(run_dir) == recorded  # the .hydra/ record and train.log included

    # An overwrite killed while it checked its data left the run in .replaced/: the next run puts it back.
    (run_dir / ".replaced").mkdir()
    for name in ("checkpoints", "hf_model", "metrics.json"):
        (run_dir / name).rename(run_dir / ".replaced" / name)
    assert "already holds a run" in last_error(run_train_here(run_dir, *args))
    assert outputs(snapshot(run_dir)) == outputs(before) and not (run_dir / ".replaced").exists()

    # A deliberate overwrite replaces the earlier run's outputs, none of them left mixed in.
    proc = run_train_here(run_dir, *args, "overwrite=true", "trainer.max_steps=6", "trainer.val_check_interval=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-step6.ckpt", "last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_sweep_into_an_earlier_sweep_folder_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep_dir}", *SMOKE, "trainer.max_steps=2", "trainer.val_check_interval=2",
            f"data.cache_dir={tmp_path / 'cache'}"]
    first = run_train_here(tmp_path / "unused", *args, "model.lr=1e-3,2e-3")
    assert first.returncode == 0 and "sweep of 2 jobs," in first.stdout  # its summary, though too short to time
    before = snapshot(sweep_dir)
    line = last_error(run_train_here(tmp_path / "unused", *args))
    assert "already holds a run" in line and str(sweep_dir / "0") in line and "hydra.sweep.dir=" in line, line
    assert snapshot(sweep_dir) == before
    # Replaced by a sweep of one job: it replaces job 0 only, and its summary is of its own job.
    again = run_train_here(tmp_path / "unused", *args, "overwrite=true")
    assert again.returncode == 0 and "sweep of 1 job," in again.stdout, again.stderr[-3000:]
    assert (sweep_dir / "1" / "metrics.json").read_bytes() == before["1/metrics.json"]


def test_prepare_only_fills_the_cache_and_trains_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    proc = run_train_here(run_dir, *SMOKE, f"data.cache_dir={cache}", "prepare_only=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepared" in proc.stdout and "training and" in proc.stdout
    assert not holds_run(run_dir) and any(cache.rglob("cache-*.arrow"))
    assert [p.name for p in run_dir.iterdir()] in ([], ["train.log"])  # a log only if something was logged
    assert not (run_dir / "train.log").exists() or (run_dir / "train.log").read_text()
    # In Hydra's own folder (outputs/DATE/TIME, made for the run): none is left behind, empty.
    monkeypatch.chdir(tmp_path)
    proc = run_train_here(None, *SMOKE, f"data.cache_dir={cache}", "prepare_only=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert [p.name for p in left] in ([], ["train.log"])
    assert left or list((tmp_path / "outputs").rglob("*")) == []  # no empty DATE/TIME


def test_output_dir_is_the_whole_run_folder(tmp_path, monkeypatch):
    # Given in place of hydra.run.dir, Hydra's own files go there too, not to outputs/DATE/TIME.
    monkeypatch.chdir(tmp_path)
    proc = run_train_here(None, *SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                          "output_dir=mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mine" / ".hydra" / "overrides.yaml").is_file() and holds_run(tmp_path / "mine")
    assert not (tmp_path / "outputs").exists()


def test_a_folder_another_run_works_in_is_refused(tmp_path):
    """A resubmitted job, or a second terminal, while the first run still goes: refused before
    anything in the folder is touched (the other run holds an flock on it)."""
    import fcntl
    import os

    run_dir, args = tmp_path / "run", [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                                       "trainer.val_check_interval=2"]
    run_dir.mkdir()
    other = os.open(run_dir, os.O_RDONLY)  # as the running process holds it
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    line = last_error(run_train_here(run_dir, *args, "ckpt_path=null"))
    assert line.startswith(f"error: another run is still working in {run_dir}"), line
    assert list(run_dir.iterdir()) == []
    os.close(other)  # that run ended
    assert run_train_here(run_dir, *args).returncode == 0
    assert run_train_here(run_dir, *args, "overwrite=true").returncode == 0  # this process let it go


def test_a_run_or_sweep_folder_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("earlier work")
    line = last_error(run_train_here(file, *SMOKE))
    assert line == f"error: the run folder {file} is a file: give a folder (hydra.run.dir=...)"
    line = last_error(run_train_here(None, "-m", f"hydra.sweep.dir={file}", *SMOKE))
    assert line == f"error: the sweep folder {file} is a file: give a folder (hydra.sweep.dir=...)"
    assert file.read_text() == "earlier work"


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        config, named = (compose("train", overrides=SMOKE, return_hydra_config=True) for _ in range(2))
        refused = compose("train", overrides=[*SMOKE, "model.lr=-1"], return_hydra_config=True)
    taken = Path(OmegaConf.select(config, "hydra.run.dir"))  # outputs/DATE/TIME (resolved once a config)
    taken.mkdir(parents=True)  # by another run started in the same second
    Preflight().on_run_start(config)
    assert Path(config.hydra.run.dir) == taken.with_name(taken.name + "_1") and Path(config.hydra.run.dir).is_dir()
    with pytest.raises(SystemExit):  # a refused command leaves no empty folder behind
        Preflight().on_run_start(refused)
    assert sorted(p.name for p in taken.parent.iterdir()) == [taken.name, taken.name + "_1"]
    # A folder given by name (here in the config, not on the command line) may be a run to resume: kept.
    with read_write(named):
        named.hydra.run.dir = str(taken)
    Preflight().on_run_start(named)
    assert named.hydra.run.dir == str(taken)


def test_sweeps_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        config = compose("train", overrides=SMOKE, return_hydra_config=True)
    taken = Path(OmegaConf.select(config, "hydra.sweep.dir"))
    taken.mkdir(parents=True)
    Preflight().on_multirun_start(config)
    own = taken.with_name(taken.name + "_1")
    assert Path(config.hydra.sweep.dir) == own and own.is_dir()
    assert f"hydra.sweep.dir={own}" in config.hydra.overrides.hydra  # what each job's config is made from


def test_a_new_run_keeps_the_log_of_a_run_that_failed_there_apart(tmp_path):
    run_dir = tmp_path / "run"
    failed = run_dir / "tensorboard" / "events.out.tfevents.1.host.1.0"
    failed.parent.mkdir(parents=True)
    failed.write_bytes(b"the failed run's curves")
    proc = run_train_here(run_dir, *SMOKE, "logger=tensorboard", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (kept,) = run_dir.glob("tensorboard-*")  # a run of its own to TensorBoard, with nothing of the new one
    assert [p.read_bytes() for p in kept.iterdir()] == [b"the failed run's curves"]
    assert failed.name not in [p.name for p in (run_dir / "tensorboard").iterdir()]
    assert "held the TensorBoard log of a run that saved no checkpoint" in proc.stdout + proc.stderr


def test_outputs_a_killed_process_was_putting_back_are_put_back_by_the_next(tmp_path, monkeypatch):
    from bert_mlm import run_folder

    monkeypatch.setattr(run_folder, "RESTORE_WAIT_S", 0.3)  # not 30 s: nothing else is at work here
    run = tmp_path / "run"
    left = run / ".replaced-999999999"  # a process killed half-way through putting them back
    (left / "checkpoints").mkdir(parents=True)
    (left / "checkpoints" / "last.ckpt").write_bytes(b"the earlier run's state")
    (run / "metrics.json").write_text("{}")  # put back before it was killed
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best-step2.ckpt").write_bytes(b"the refused run's")
    run_folder.put_back(run)
    assert snapshot(run) == {"metrics.json": b"{}", "checkpoints/last.ckpt": b"the earlier run's state"}
    run_folder.put_back(run)  # and then nothing more to do, at once
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.json"]


@pytest.mark.parametrize("args, says", [
    (["ckpt_path=last"], "last.ckpt does not exist"),
    (["trainer=gpu"], "none is visible"),  # on this CPU-only machine (GPU machines skip it)
    (["trainer.devices=99"], "trainer.devices=99"),
    (["data=text"], "data=text needs files"),
], ids=["missing-checkpoint", "no-gpu", "devices", "no-files"])
def test_refused_before_a_folder_is_made(tmp_path, monkeypatch, args, says):
    if args == ["trainer=gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    line = last_error(run_train_here(None, *SMOKE, *args))
    assert line.startswith("error: ") and says in line, line
    assert list((tmp_path / "outputs").rglob("*")) == []  # no .hydra/, no train.log, no DATE/TIME
