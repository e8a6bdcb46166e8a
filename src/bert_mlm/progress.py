"""The console progress bar: one bar for the whole run, counting optimizer steps up to
`trainer.max_steps`. Lightning's own bar starts again every epoch, and training by steps
(max_epochs=-1) its rich variant reads "Epoch 1/-2"."""

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args):
        if trainer.max_steps <= 0:  # training by epochs: Lightning's bar, one per epoch
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        bar.set_description(f"Training (epoch {trainer.current_epoch})")
        self._show(trainer, bar)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            self._show(trainer, bar)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def _show(trainer, bar):
        if not bar.disable:
            bar.n = trainer.global_step  # a resumed run starts where it stopped
            bar.refresh()
