"""TensorBoard's TEXT tab: at each validation, the model's top guesses for the [MASK] in a
few fixed sentences, so a person sees the predictions improve as training goes on."""

from typing import Annotated

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from pydantic import Field, PositiveInt

from bert_mlm.errors import UserError


class MaskProbes(L.Callback):
    def __init__(self, sentences: Annotated[list[str], Field(min_length=1)], top_k: PositiveInt = 5):
        self.sentences, self.top_k = sentences, top_k

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Checked before the first validation, with the model's tokenizer: not found out at a
        validation mid-training, where the run would stop before saving."""
        tokenizer, model = pl_module.tokenizer, pl_module.model.config
        if self.top_k > len(tokenizer):
            raise UserError(f"callbacks.probes.top_k={self.top_k} is above the vocabulary's {len(tokenizer)} tokens")
        for sentence in self.sentences:
            if tokenizer.mask_token not in sentence:
                raise UserError(f"callbacks.probes.sentences: {sentence[:40]!r} has no {tokenizer.mask_token} "
                                "to predict: put one where a word should be guessed")
            if len(tokenizer(sentence)["input_ids"]) > model.max_position_embeddings:
                raise UserError(f"callbacks.probes.sentences: {sentence[:40]!r}... is longer than the model's "
                                f"{model.max_position_embeddings} positions: shorten it")

    def predictions(self, pl_module) -> str:
        """A markdown table: sentence, then the top-k tokens with their probabilities."""
        tokenizer = pl_module.tokenizer
        batch = tokenizer(self.sentences, return_tensors="pt", padding=True).to(pl_module.device)
        with torch.no_grad():
            logits = pl_module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = ["| sentence | top guesses |", "| --- | --- |"]
        for sentence, ids, row_logits in zip(self.sentences, batch["input_ids"], logits):
            for position in (ids == tokenizer.mask_token_id).nonzero().flatten().tolist():
                top = row_logits[position].float().softmax(-1).topk(self.top_k)
                guesses = ", ".join(
                    f"{tokenizer.convert_ids_to_tokens(i)} ({p:.2f})" for p, i in zip(top.values.tolist(), top.indices.tolist())
                )
                rows.append(f"| {sentence} | {guesses} |")
        return "\n".join(rows)

    def on_validation_end(self, trainer, pl_module):
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if loggers and trainer.is_global_zero and not trainer.sanity_checking:
            loggers[0].experiment.add_text("mask_probes", self.predictions(pl_module), trainer.global_step)
