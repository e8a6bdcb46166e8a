"""checkpoints/last.ckpt, always the newest state: one callback writes it, whatever the
trigger (every N minutes or steps of training, each validation, SIGTERM or Ctrl-C), and
every checkpoint write is timed in the log."""

import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt

from bert_mlm.cadence import logs_at

log = logging.getLogger(__name__)


def last_checkpoint(run_dir: str | Path) -> Path:
    """A run folder's newest state, where LastCheckpoint writes it (checks.py holds the
    callbacks to the run folder): what ckpt_path=last and a requeued job resume."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Saves last.ckpt every `every_minutes` of training and/or `every_n_steps` steps, at
    the end of each validation and of training, and when the run is told to stop. With
    `keep_periodic`=K the last K periodic saves are also kept, as step{N}.ckpt.

    A Checkpoint subclass, so Lightning runs it after the other callbacks, the best-by-
    val/loss ModelCheckpoint included: the state it saves has their newest state."""

    def __init__(self, dirpath: str, every_minutes: NonNegativeFloat | None = 30,
                 every_n_steps: PositiveInt | None = None, keep_periodic: NonNegativeInt = 0):
        self.dir = Path(dirpath)
        self.path = self.dir / "last.ckpt"
        self.every_s = every_minutes * 60 if every_minutes else None
        self.every_n_steps = every_n_steps
        self.keep_periodic = keep_periodic
        self._saved_at = time.monotonic()
        self._step = self._saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule):
        self._saved_at = time.monotonic()  # the interval counts training time, from here
        self._step = trainer.global_step  # (the first batches of an accumulated step end none)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._step:  # gradient accumulation: no optimizer step in this batch
            return
        self._step = step
        by_steps = bool(self.every_n_steps) and step % self.every_n_steps == 0
        by_time = self.every_s is not None and time.monotonic() - self._saved_at >= self.every_s
        if trainer.world_size > 1 and self.every_s is not None:
            # The ranks' clocks differ and every rank must take part in a save: rank 0
            # decides. A broadcast makes the host wait for the device, so only at logging
            # steps, where it waits for the logged values anyway.
            by_time = logs_at(step, trainer) and trainer.strategy.broadcast(by_time)
        if by_steps or by_time:
            self._save(trainer)
            if self.keep_periodic:
                self._keep_copy(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule):
        if trainer.global_step != self._saved_step:  # the final state, when no validation saved it
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException):
        # SIGTERM (and Ctrl-C, which train.py turns into it): Lightning finishes the batch,
        # then raises this on every rank.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)

    def _save(self, trainer: L.Trainer):
        if trainer.fast_dev_run:  # a debugging run saves nothing, as with Lightning's own
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # every rank: it synchronizes them
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def _keep_copy(self, trainer: L.Trainer):
        """step{N}.ckpt as a hard link to this last.ckpt (no second write: the next save
        replaces last.ckpt by a new file), and only the newest `keep_periodic` of them."""
        if not trainer.is_global_zero:
            return
        copy = self.path.with_name(f"step{trainer.global_step}.ckpt")
        copy.unlink(missing_ok=True)  # a resumed run passing this step again
        try:
            copy.hardlink_to(self.path)
        except OSError:  # a file system without hard links
            shutil.copyfile(self.path, copy)
        kept = sorted(self.dir.glob("step*.ckpt"), key=lambda p: int(p.stem.removeprefix("step")))
        for old in kept[: -self.keep_periodic]:
            old.unlink()


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the best by val/loss), which also follows its run folder
    when that was moved or renamed before a resume. Lightning forgets the best score across a
    change of folder: the next validation would save a new "best" even when worse, and the
    earlier best-stepN.ckpt would stay beside it."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved_dir = state_dict.get("dirpath")
        if saved_dir and saved_dir != self.dirpath:
            def here(path: str) -> str:
                return str(Path(self.dirpath) / Path(path).name) if path else path

            moved = {here(path): score for path, score in state_dict.get("best_k_models", {}).items()}
            if all(Path(path).exists() for path in moved):  # this run's files, in the moved folder
                state_dict = {**state_dict, "dirpath": self.dirpath, "best_k_models": moved,
                              **{key: here(state_dict.get(key, "")) for key in
                                 ("best_model_path", "kth_best_model_path", "last_model_path")}}
        super().load_state_dict(state_dict)

    @property
    def state_key(self) -> str:  # ModelCheckpoint's: checkpoints saved with it resume with this one
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


class TimedCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint whole or not at all, and logs how long it took and how big it
    is: on fast hardware a multi-GB save every few minutes is a share of the run worth knowing.

    Whole or not at all: written beside its name, then renamed over it (atomic on one file
    system). Lightning's own writes to a temporary file in $TMPDIR, then moves it: across
    file systems that move is a copy onto last.ckpt, which an interruption leaves cut short,
    and a write killed there leaves a file of the checkpoint's size in $TMPDIR."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        start = time.perf_counter()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")  # one name: a killed write's is written over next time
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        size_mb = path.stat().st_size / 2**20
        log.info(f"saved {path} (step {checkpoint['global_step']}, {size_mb:.0f} MB) in "
                 f"{time.perf_counter() - start:.1f} s")
