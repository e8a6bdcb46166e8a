"""The console progress bar: one bar for the whole run, counting optimizer steps up to
`trainer.max_steps`, or, for a time budget without a step limit (trainer.max_time,
max_steps=-1), the budget's seconds. Lightning's own bar starts again every epoch, and
training by steps (max_epochs=-1) its rich variant reads "Epoch 1/-2"."""

from lightning.pytorch.callbacks import Timer, TQDMProgressBar

from bert_mlm.cadence import logs_at
from bert_mlm.schedule import budget_timer

# Lightning's format without the rate: a budget's seconds pass at one per second.
BUDGET_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
# The logged values the bar shows. Not logged with prog_bar=True: Lightning would read those
# back from the device after every batch until the epoch ends (a wait for the device per step).
SHOWN = ("train/loss", "train/tokens_per_sec", "train/mfu")


class StepProgressBar(TQDMProgressBar):
    # Replaced, never changed in place: no instance shares another's.
    _shown: dict[str, float] = {}
    _read_at = -1

    def get_metrics(self, trainer, pl_module) -> dict:
        step = trainer.global_step
        if step != self._read_at and logs_at(step, trainer):  # read once, where the host waits anyway
            self._shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k in SHOWN}
            self._read_at = step
        return {**super().get_metrics(trainer, pl_module), **self._shown}

    def on_train_start(self, trainer, *args):
        # Here, not at the epoch's start: a run resumed mid-epoch does not start that epoch again.
        super().on_train_start(trainer, *args)
        if _by_epochs(trainer):
            return
        bar, timer = self.train_progress_bar, _budget(trainer)
        if timer:
            bar.total = round(timer.time_elapsed() + timer.time_remaining())
            bar.bar_format = BUDGET_FORMAT
        else:
            bar.total = trainer.max_steps
        self._show(trainer, bar)

    def on_train_epoch_start(self, trainer, *args):
        if _by_epochs(trainer):  # Lightning's bar, one per epoch
            return super().on_train_epoch_start(trainer, *args)
        self._show(trainer, self.train_progress_bar)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if _by_epochs(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            self._show(trainer, bar, refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # and redraws, once a step

    def on_exception(self, trainer, pl_module, exception):
        # The bars' line ends, so that what comes next (the save's log, how to resume, an
        # `error:` line) starts a line of its own rather than trailing the bar.
        for bar in (self._val_progress_bar, self._train_progress_bar):
            if bar is not None:
                bar.close()

    @staticmethod
    def _show(trainer, bar, refresh: bool = True):
        if bar.disable:
            return
        # A resumed run starts where it stopped: at its step, or its restored elapsed time.
        timer = _budget(trainer)
        bar.n = min(int(timer.time_elapsed()), bar.total) if timer else trainer.global_step
        step = f", step {trainer.global_step}" if timer else ""
        bar.set_description(f"Training (epoch {trainer.current_epoch}{step})", refresh=refresh)


def _budget(trainer) -> Timer | None:
    """The time budget the bar counts, when there is no step limit to count instead."""
    return budget_timer(trainer.callbacks) if trainer.max_steps <= 0 else None


def _by_epochs(trainer) -> bool:
    return trainer.max_steps <= 0 and _budget(trainer) is None
