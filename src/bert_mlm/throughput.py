"""train/tokens_per_sec and train/mfu: input tokens (padding excluded) per second of wall
time, and the model FLOPs they stand for as a share of the device's peak."""

import time

import lightning as L
import torch
from pydantic import PositiveFloat, PositiveInt

from bert_mlm.cadence import logs_at
from bert_mlm.flops import flops_per_token, measure_peak_flops, peak_flops


class Throughput(L.Callback):
    """Times training from the end of batch `warmup_batches` on, so the clock covers
    data loading, masking, forward, backward and optimizer step of every later batch, and
    the periodic saves of last.ckpt; validation and the checkpoint saves after it (until
    the next training batch starts) are left out.
    Tokens are counted on the host, by the collator: the step waits for no device.

    MFU divides by `peak_tflops` when set, else by the datasheet bf16 peak of a known GPU,
    or on a CPU by what a large matrix product in the run's precision reaches there,
    measured at the start (a fraction of a second).

    The checkpoint keeps the tokens and seconds measured so far, so the rate at the end
    (metrics.json) is the whole run's, across resumes; the logged one is the current rate."""

    def __init__(self, warmup_batches: PositiveInt = 3, peak_tflops: PositiveFloat | None = None):
        self.warmup_batches = warmup_batches
        self.peak_tflops = peak_tflops
        self.tokens_per_sec: float | None = None
        self._start = None  # also read by Lightning's sanity check, which comes before on_train_start
        self._validation_start: float | None = None  # of a validation during training, until the next batch
        self._earlier = {"tokens": 0.0, "seconds": 0.0}  # measured before a resume (all ranks' tokens)

    def on_train_start(self, trainer, pl_module):
        self._batches = 0
        self._tokens = 0  # this rank's, since the start
        self._start = self._validation_start = None
        self._paused = 0.0  # seconds spent in validation (and the saves after it) since the start
        self._flops_per_token = None
        device = pl_module.device
        if self.peak_tflops:
            peak = self.peak_tflops * 1e12
        elif device.type == "cpu":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            peak = measure_peak_flops("cpu", dtype, n=1024, reps=4, tries=2)
        else:
            peak = peak_flops(device)
        self._peak = peak and peak * trainer.world_size
        self._world_size = trainer.world_size

    def _seconds(self) -> float:
        """Of training since the start: without validations, the one under way included."""
        now = time.perf_counter()
        pausing = now - self._validation_start if self._validation_start is not None else 0.0
        return now - self._start - self._paused - pausing

    def _rate(self, tokens: float) -> float:
        return tokens / self._seconds()

    def state_dict(self) -> dict[str, float]:
        if self._start is None:
            return dict(self._earlier)
        # Rank 0's tokens for all (a save is no time for a collective); exact for packed data.
        return {"tokens": self._earlier["tokens"] + self._tokens * self._world_size,
                "seconds": self._earlier["seconds"] + self._seconds()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._earlier = dict(state_dict)
        self._set_rate(**self._earlier)  # a run resumed after its last step trains no more

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and self._start is not None:
            self._validation_start = time.perf_counter()

    def _end_pause(self):
        # Not at validation's end: Lightning runs the checkpoint callbacks' saves after it.
        if self._validation_start is not None:
            self._paused += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._end_pause()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1
        if self._batches == self.warmup_batches:
            self._start = time.perf_counter()
            mlm_probability = trainer.datamodule.train_collator.mlm_probability
            seq_len = batch["input_ids"].shape[1]
            self._flops_per_token = flops_per_token(pl_module.model.config, seq_len, mlm_probability)
        elif self._start is not None:
            self._tokens += batch["num_tokens"]
            if logs_at(trainer.global_step, trainer):
                # Every rank has the same number of batches; packed ones the same tokens too.
                rate = self._rate(self._tokens * trainer.world_size)
                metrics = {"train/tokens_per_sec": rate}
                if self._peak:
                    metrics["train/mfu"] = rate * self._flops_per_token / self._peak
                pl_module.log_dict(metrics, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module):
        if self._start is not None:  # this process's share joins the earlier ones: the checkpoint saved next keeps it
            self._end_pause()  # the final validation's
            mine = torch.tensor(float(self._tokens), device=pl_module.device)
            tokens = trainer.strategy.reduce(mine, reduce_op="sum").item()  # all ranks'
            self._earlier = {"tokens": self._earlier["tokens"] + tokens,
                             "seconds": self._earlier["seconds"] + self._seconds()}
            self._start = None
        self._set_rate(**self._earlier)

    def _set_rate(self, tokens: float, seconds: float) -> None:
        self.tokens_per_sec = tokens / seconds if seconds else None  # None: too few batches to measure
