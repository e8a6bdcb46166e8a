"""MLMDataModule: corpus -> tokens (cached by `datasets`) -> blocks -> dynamically masked batches."""

import logging

import lightning as L
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from bert_mlm import corpus
from bert_mlm.errors import UserError
from bert_mlm.masking import MaskingCollator
from bert_mlm.order import EpochShuffle, WithMaskSeeds

CORPORA = ("pydocs", "text", "hub")
log = logging.getLogger(__name__)


def _tokenize(batch, tokenizer, packing: bool, max_length: int):
    texts = [t for t in batch["text"] if isinstance(t, str) and t.strip()]
    ids = tokenizer(texts, add_special_tokens=not packing, verbose=False)["input_ids"]
    if packing:  # special tokens are added per block, when packing
        return {"input_ids": ids}
    # One example per line: longer lines keep their first max_length - 1 tokens and [SEP].
    truncated = [len(x) > max_length for x in ids]
    ids = [[*x[: max_length - 1], x[-1]] if cut else x for x, cut in zip(ids, truncated)]
    return {"input_ids": ids, "truncated": truncated}


def _pack(batch, cls_id: int, sep_id: int, max_length: int):
    """Concatenates examples, [SEP] after each, and cuts [CLS] + chunk + [SEP] blocks.
    The tail shorter than a block in each map batch (1000 examples) is dropped."""
    stream = []
    for ids in batch["input_ids"]:
        stream.extend(ids)
        stream.append(sep_id)
    n = max_length - 2
    return {
        "input_ids": [[cls_id, *stream[i : i + n], sep_id] for i in range(0, len(stream) - n + 1, n)]
    }


class MLMDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        corpus: str = "pydocs",
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        text_column: str = "text",
        val_percent: float = 5.0,
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        max_length: int = 128,
        packing: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        streaming: bool = False,
        val_rows: int = 1000,
        shuffle_buffer: int = 10_000,
        mlm_probability: float = 0.15,
        whole_word_mask: bool = False,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if corpus not in CORPORA:
            raise UserError(f"data.corpus '{corpus}' is unknown: use one of {CORPORA}")
        if not 0 < mlm_probability < 1:
            raise UserError(f"data.mlm_probability={mlm_probability} must be between 0 and 1 (exclusive)")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise UserError("data.mask_prob and data.random_prob must be >= 0 and sum to at most 1")
        if not 0 < val_percent < 100:
            raise UserError(f"data.val_percent={val_percent} must be between 0 and 100")
        if max_length < 8:
            raise UserError(f"data.max_length={max_length} is too short: use at least 8")
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.train_files, self.val_files = train_files, val_files
        self.text_column, self.val_percent = text_column, val_percent
        self.hub_dataset, self.hub_config = hub_dataset, hub_config
        self.max_length, self.packing = max_length, packing
        self.batch_size, self.num_workers = batch_size, num_workers
        self.streaming, self.val_rows, self.shuffle_buffer = streaming, val_rows, shuffle_buffer
        self.seed, self.cache_dir = seed, cache_dir
        masking = dict(
            mask_token_id=tokenizer.mask_token_id,
            pad_token_id=tokenizer.pad_token_id,
            special_token_ids=tokenizer.all_special_ids,
            vocab_size=len(tokenizer),
            mlm_probability=mlm_probability,
            mask_prob=mask_prob,
            random_prob=random_prob,
            seed=seed,
            continuation_ids=[i for t, i in tokenizer.get_vocab().items() if t.startswith("##")]
            if whole_word_mask
            else None,
        )
        self.train_collator = MaskingCollator(**masking)
        self.val_collator = MaskingCollator(**masking, fixed_masks=True)
        self.train_set = self.val_set = None

    def _raw(self) -> corpus.Corpus:
        if self.corpus == "pydocs":
            raw = corpus.pydocs(self.cache_dir, self.streaming)
        elif self.corpus == "text":
            raw = corpus.text_files(self.train_files, self.val_files, self.cache_dir, self.streaming)
        else:
            raw = corpus.hub(self.hub_dataset, self.hub_config, self.cache_dir, self.streaming)
        return corpus.with_validation(raw, self.text_column, self.val_percent, self.val_rows, self.seed)

    def train_texts(self, batch_size: int = 1000):
        """The training text, in lists of up to `batch_size` lines (to train a tokenizer on)."""
        train = self._raw()["train"]
        yield from (batch["text"] for batch in train.iter(batch_size=batch_size))

    def _tokenized(self, raw: corpus.Corpus) -> corpus.Corpus:
        """Token blocks. On a Dataset `datasets` caches each map by fingerprint, so later
        runs read the cache; on a stream the maps run lazily, as examples are drawn."""
        def progress(desc: str) -> dict:  # a progress bar; a stream's map takes no `desc`
            return {} if self.streaming else {"desc": desc}

        tokens = raw.map(
            _tokenize,
            batched=True,
            remove_columns=["text"],
            fn_kwargs=dict(tokenizer=self.tokenizer, packing=self.packing, max_length=self.max_length),
            **progress("Tokenizing"),
        )
        if self.packing:
            tokens = tokens.map(
                _pack,
                batched=True,
                fn_kwargs=dict(
                    cls_id=self.tokenizer.cls_token_id,
                    sep_id=self.tokenizer.sep_token_id,
                    max_length=self.max_length,
                ),
                **progress(f"Packing into blocks of {self.max_length}"),
            )
        return tokens

    def prepare_data(self):
        # Lightning calls this on one process per node before the others run setup().
        if not self.streaming:
            self._tokenized(self._raw())

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # Streams: each rank draws its own masks (otherwise an example's index fixes them).
        self.train_collator.seed = self.seed + rank
        if self.streaming:
            self._setup_stream(rank, world_size)
        else:
            self._setup_tokenized()

    def _setup_stream(self, rank: int, world_size: int):
        raw = self._raw()
        raw["train"] = raw["train"].shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        # Each rank reads its own shard (whole files when they divide evenly, else every Nth example).
        tokens = self._tokenized(raw)
        self.train_set, self.val_set = (
            split_dataset_by_node(tokens[split], rank, world_size) for split in ("train", "validation")
        )

    def _setup_tokenized(self):
        tokens = self._tokenized(self._raw())
        for split, ds in tokens.items():
            if len(ds) == 0:
                raise UserError(
                    f"the {split} text is shorter than one block of data.max_length={self.max_length} "
                    "tokens: add text or lower data.max_length"
                )
        if len(tokens["train"]) < self.batch_size:
            raise UserError(
                f"the training text makes {len(tokens['train'])} examples, fewer than one batch "
                f"(data.batch_size={self.batch_size}): add text or lower data.batch_size"
            )
        if not self.packing:
            cut = sum(tokens["train"]["truncated"])
            if cut:
                log.warning(
                    f"{cut} of {len(tokens['train'])} training lines are longer than "
                    f"data.max_length={self.max_length} tokens and were truncated (data.packing=true keeps all text)"
                )
            tokens = tokens.remove_columns("truncated")
        self.train_set, self.val_set = tokens["train"], tokens["validation"]

    def _loader(self, dataset, collator, train: bool, sampler=None) -> DataLoader:
        # StatefulDataLoader: Lightning saves its position in checkpoints, so a run resumed
        # mid-epoch goes on from the next batch instead of starting the epoch again.
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Worker seeds from the loader's own generator, not the global one that dropout
            # draws from: a resumed run then draws the same dropout masks as an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=train,  # full training batches only: steady shapes and step sizes
            collate_fn=collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.streaming:  # shuffled through a buffer as it is read
            return self._loader(self.train_set, self.train_collator, train=True)
        return self._loader(
            WithMaskSeeds(self.train_set, self.seed),
            self.train_collator,
            train=True,
            sampler=EpochShuffle(len(self.train_set), self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_collator, train=False)
