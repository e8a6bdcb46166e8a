"""When things happen in training: the steps at which the host may wait for the device, and
how often validation runs."""

import lightning as L
from lightning.pytorch.callbacks import Timer
from omegaconf import DictConfig, OmegaConf


def logs_at(step: int, trainer: L.Trainer) -> bool:
    """Whether Lightning writes the values logged in the optimizer step that brings the count
    to `step` (every trainer.log_every_n_steps). The host reads those values from the device
    there anyway, so whatever else makes it wait (reading a value, a collective) runs at these
    steps only, and the steps between queue their work on the device without a pause."""
    return step % trainer.log_every_n_steps == 0


def validation_cadence(trainer: DictConfig) -> dict:
    """The Trainer's val_check_interval and check_val_every_n_epoch for the trainer config.
    val_check_interval null: every 1,000 steps, or halfway through a shorter run (the default
    40 steps: at 20 and 40); Lightning counts batches, hence the accumulation. A time budget
    without a step limit (trainer.max_time, max_steps=-1) has no step count to halve: it
    validates by time, halfway through the budget or every hour in longer ones, and at its end
    (Lightning validates a run that stops early). A run by epochs validates after each epoch."""
    cadence = {"val_check_interval": trainer.val_check_interval,
               "check_val_every_n_epoch": trainer.check_val_every_n_epoch}
    if isinstance(trainer.val_check_interval, float):  # a share of each epoch
        return {**cadence, "check_val_every_n_epoch": trainer.check_val_every_n_epoch or 1}
    if trainer.val_check_interval is not None:
        return cadence
    if trainer.max_steps < 0 and trainer.max_time is not None:
        return {**cadence, "val_check_interval": {"seconds": min(_seconds(trainer.max_time) / 2, 3600)}}
    if trainer.max_steps < 0:  # by epochs: their length is not known yet
        return {"val_check_interval": 1.0, "check_val_every_n_epoch": trainer.check_val_every_n_epoch or 1}
    steps = min(1000, trainer.max_steps // 2) if trainer.max_steps >= 2 else 1000
    return {**cadence, "val_check_interval": steps * trainer.accumulate_grad_batches}


def _seconds(max_time: str | DictConfig) -> float:
    """trainer.max_time ("DD:HH:MM:SS" or timedelta's arguments) in seconds, read by
    Lightning's Timer as the Trainer will read it."""
    duration = OmegaConf.to_container(max_time) if isinstance(max_time, DictConfig) else max_time
    return Timer(duration=duration).time_remaining()
