"""train/tokens_per_sec: input tokens (padding excluded) per second of wall time."""

import time

import lightning as L
import torch


class TokensPerSecond(L.Callback):
    """Times training from the end of batch `warmup_batches` on, so the clock covers
    data loading, masking, forward, backward and optimizer step of every later batch.
    Tokens are summed on the device and read only when logged, to avoid a sync per step."""

    def __init__(self, warmup_batches: int = 3):
        self.warmup_batches = warmup_batches
        self.tokens_per_sec: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._batches = 0
        self._tokens = torch.zeros((), dtype=torch.long, device=pl_module.device)
        self._start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1
        if self._batches == self.warmup_batches:
            self._start = time.perf_counter()
        elif self._start is not None:
            self._tokens += batch["attention_mask"].sum()
            if trainer.global_step % trainer.log_every_n_steps == 0:
                # Every rank has the same number of batches; packed ones the same tokens too.
                rate = self._tokens.item() * trainer.world_size / (time.perf_counter() - self._start)
                pl_module.log("train/tokens_per_sec", rate, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module):
        if self._start is None:
            return  # too few batches to measure
        tokens = trainer.strategy.reduce(self._tokens.float(), reduce_op="sum")
        self.tokens_per_sec = tokens.item() / (time.perf_counter() - self._start)
