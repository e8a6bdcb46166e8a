"""MLMDataModule: corpus -> tokens (cached by `datasets`) -> blocks -> dynamically masked batches."""

import itertools
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.distributed import split_dataset_by_node
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from pydantic import AfterValidator, Field, FilePath, NonNegativeInt, PositiveInt, ValidationInfo
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from bert_mlm import corpus
from bert_mlm.corpus import check_files
from bert_mlm.checks import Probability
from bert_mlm.errors import UserError
from bert_mlm.masking import MaskingCollator
from bert_mlm.order import EpochShuffle, WithMaskSeeds
from bert_mlm.workers import auto_num_workers, available_cores

log = logging.getLogger(__name__)


def _fits_with_mask_prob(random_prob: float, info: ValidationInfo) -> float:
    mask_prob = info.data.get("mask_prob", 0)
    if mask_prob + random_prob > 1:
        raise ValueError(f"mask_prob={mask_prob} + random_prob={random_prob} is above 1: both are shares "
                         "of the chosen tokens")
    return random_prob


# Rows per tokenizer call, and per stream that packing cuts (its tail shorter than a block is
# dropped): datasets.map's default batch, so the blocks are those that earlier versions made.
ROWS_PER_STREAM = 1000
# Rows per map batch, and so per Arrow record batch in the cache (tokens: about 1 MB, blocks:
# about 10 MB). Opening a cached file reads the header of every record batch, and the kernel
# maps in the pages around each one it faults in (64 kB, or a whole large folio): with
# 1000-row batches a quarter of every cached file stayed in the RSS of each process that
# opened it, which grew with the corpus.
TOKENIZE_BATCH, PACK_BATCH = 10 * ROWS_PER_STREAM, 100 * ROWS_PER_STREAM
STREAM_SAMPLE = 1000  # a stream's first lines, read at the start to warn of truncation


def _files(key: str, files: Sequence | None) -> dict[str, list]:
    """`key`: the files' names; `key`_bytes: their sizes (None for a file that is not there)."""
    paths = [Path(f) for f in files or []]
    return {key: [p.name for p in paths], f"{key}_bytes": [p.stat().st_size if p.is_file() else None for p in paths]}


def _id_type(vocab_size: int) -> pa.DataType:
    """Token ids as uint16 where the vocabulary fits (BERT's 30522 does): half the cache and
    page cache of int32. The collator widens them to int64 as it pads."""
    return pa.uint16() if vocab_size <= 2**16 else pa.int32()


def _tokenize(batch, tokenizer, packing: bool, max_length: int, id_type: pa.DataType) -> pa.Table:
    """Token ids of the non-blank lines (with [CLS] and [SEP] unless packing): Arrow in and
    out, so that the table goes to the cache (or down the stream) as it is."""
    texts = [t for t in batch.column("text").to_pylist() if isinstance(t, str) and t.strip()]
    arrays, truncated = [], []
    # ROWS_PER_STREAM lines at a time: the tokenizer's Encodings hold offsets, strings and
    # masks for every token, many times the ids.
    for start in range(0, len(texts), ROWS_PER_STREAM):
        # Only the ids: the attention masks and token types would be thrown away.
        ids = tokenizer(texts[start : start + ROWS_PER_STREAM], add_special_tokens=not packing,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
        if not packing:  # one example per line: longer lines keep their first max_length - 1 tokens and [SEP]
            cut = [len(x) > max_length for x in ids]
            ids = [[*x[: max_length - 1], x[-1]] if c else x for x, c in zip(ids, cut)]
            truncated += cut
        arrays.append(pa.array(ids, pa.list_(id_type)))
    columns = {"input_ids": pa.chunked_array(arrays, pa.list_(id_type))}
    if not packing:
        columns["truncated"] = pa.array(truncated, pa.bool_())
    return pa.table(columns)


def _pack(batch: pa.Table, cls_id: int, sep_id: int, max_length: int) -> pa.Table:
    """Each ROWS_PER_STREAM examples, [SEP] after each, are concatenated and cut into
    [CLS] + chunk + [SEP] blocks; the tail shorter than a block is dropped."""
    starts = range(0, max(batch.num_rows, 1), ROWS_PER_STREAM)
    return pa.concat_tables([_pack_stream(batch.slice(s, ROWS_PER_STREAM), cls_id, sep_id, max_length) for s in starts])


def _pack_stream(rows: pa.Table, cls_id: int, sep_id: int, max_length: int) -> pa.Table:
    # In numpy on the Arrow columns: no Python object per token.
    ids = rows.column("input_ids").combine_chunks()
    values = ids.flatten().to_numpy()
    stream = np.insert(values, np.cumsum(pc.list_value_length(ids).to_numpy()), sep_id)
    n = max_length - 2
    chunks = stream[: len(stream) // n * n].reshape(-1, n)  # (blocks, n)
    blocks = np.empty((len(chunks), max_length), values.dtype)
    blocks[:, 0], blocks[:, 1:-1], blocks[:, -1] = cls_id, chunks, sep_id
    offsets = pa.array(np.arange(0, blocks.size + 1, max_length, dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(blocks.ravel()))})


class MLMDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        corpus: Literal["pydocs", "text", "hub"] = "pydocs",
        train_files: list[FilePath] | None = None,
        val_files: list[FilePath] | None = None,
        text_column: str = "text",
        val_percent: Annotated[float, Field(gt=0, lt=100)] = 5.0,
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        max_length: Annotated[int, Field(ge=8)] = 128,
        packing: bool = True,
        batch_size: PositiveInt = 32,
        num_workers: NonNegativeInt | None = None,
        num_proc: PositiveInt | None = None,
        val_max_blocks: PositiveInt | None = 2000,
        streaming: bool = False,
        val_rows: PositiveInt = 1000,
        shuffle_buffer: PositiveInt = 10_000,
        mlm_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15,
        whole_word_mask: bool = False,
        mask_prob: Probability = 0.8,
        random_prob: Annotated[Probability, AfterValidator(_fits_with_mask_prob)] = 0.1,
        val_mlm_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        """The ranges in the annotations are checked with the rest of the config (checks.py)."""
        super().__init__()
        check_files(corpus, train_files, val_files)
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.train_files, self.val_files = train_files, val_files
        self.text_column, self.val_percent = text_column, val_percent
        self.hub_dataset, self.hub_config = hub_dataset, hub_config
        self.max_length, self.packing = max_length, packing
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_proc = num_proc or available_cores()
        self.val_max_blocks = val_max_blocks
        self.streaming, self.val_rows, self.shuffle_buffer = streaming, val_rows, shuffle_buffer
        self.seed, self.cache_dir = seed, cache_dir
        self._saved_workers: int | None = None  # a resumed run's DataLoader workers
        # What makes the batches and their masks: a resumed run must have the same (resume.check_fits).
        # Files by name and size: the same file by another path (or from another folder) is the
        # same; a file of that name with other text (appended to since) is not.
        self.settings = {"corpus": corpus, **_files("train_files", train_files), **_files("val_files", val_files),
                         "text_column": text_column,
                         "val_percent": val_percent, "hub_dataset": hub_dataset, "hub_config": hub_config,
                         "max_length": max_length, "packing": packing, "batch_size": batch_size,
                         "streaming": streaming, "mlm_probability": mlm_probability,
                         "whole_word_mask": whole_word_mask, "mask_prob": mask_prob, "random_prob": random_prob,
                         "seed": seed}
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
        # Validation masks as BERT does (15%, 80% [MASK] / 10% random, token by token) whatever
        # the training's masking: val/loss then compares across runs and a sweep's jobs.
        bert = {"mlm_probability": val_mlm_probability, "mask_prob": 0.8, "random_prob": 0.1, "continuation_ids": None}
        self.val_collator = MaskingCollator(**{**masking, **bert}, fixed_masks=True)
        self.train_set = self.val_set = None

    def _raw(self) -> corpus.Corpus:
        if self.corpus == "pydocs":
            raw = corpus.pydocs(self.cache_dir, self.streaming)
        elif self.corpus == "text":
            raw = corpus.text_files(self.train_files, self.val_files, self.cache_dir, self.streaming)
        else:
            raw = corpus.hub(self.hub_dataset, self.hub_config, self.cache_dir, self.streaming)
        return corpus.with_validation(raw, self.text_column, self.val_percent, self.val_rows, self.seed)

    @property
    def text_source(self) -> dict:
        """The settings that pick the training text (not how it is cut or masked): its files
        by name and size, as a resume compares them (`changed_settings`)."""
        keys = ("corpus", "train_files", "train_files_bytes", "text_column", "hub_dataset", "hub_config")
        return {f"data.{k}": self.settings[k] for k in keys}

    def state_dict(self) -> dict:
        # In each checkpoint, beside the DataLoader's position, which is only valid for as many workers.
        return {"settings": self.settings, "workers": self._workers()}

    def load_state_dict(self, state: dict) -> None:
        self._saved_workers = state.get("workers")  # none in older checkpoints

    def changed_settings(self, state: dict) -> list[str]:
        """The settings of a checkpoint's run (its state_dict) that this one does not share.
        A different data.num_workers too: the DataLoader's saved position is its workers'."""
        saved = dict(state.get("settings", {}))
        for key in ("train_files", "val_files"):  # older checkpoints: paths as given
            saved[key] = [Path(f).name for f in saved.get(key, [])]
        changed = [f"{'seed' if k == 'seed' else f'data.{k}'}={saved[k]}" for k in saved
                   if self.settings.get(k) != saved[k]]
        workers = state.get("workers")
        if self.num_workers is not None and workers is not None and self.num_workers != workers:
            changed.append(f"data.num_workers={workers}")
        return changed

    def train_texts(self, batch_size: int = 1000):
        """The training text, in lists of up to `batch_size` lines (to train a tokenizer on)."""
        train = self._raw()["train"]
        yield from (batch["text"] for batch in train.iter(batch_size=batch_size))

    def _tokenized(self, raw: corpus.Corpus) -> corpus.Corpus:
        """Token blocks. On a Dataset `datasets` caches each map by fingerprint, so later
        runs read the cache; on a stream the maps run lazily, as examples are drawn."""
        def batches(desc: str, rows: int) -> dict:
            # A stream's map takes no progress bar nor cache writer, and its first blocks
            # should not wait for many rows.
            if self.streaming:
                return {"batch_size": ROWS_PER_STREAM}
            return {"desc": desc, "batch_size": rows, "writer_batch_size": rows}

        tokens = raw.with_format("arrow").map(
            _tokenize,
            batched=True,
            remove_columns=["text"],
            fn_kwargs=dict(tokenizer=self.tokenizer, packing=self.packing, max_length=self.max_length,
                           id_type=_id_type(len(self.tokenizer))),
            # In parallel: each row's tokens do not depend on how the rows were shared out.
            **batches("Tokenizing", TOKENIZE_BATCH),
            **({} if self.streaming else {"num_proc": self.num_proc}),
        )
        # Packing runs in one process: its streams of ROWS_PER_STREAM rows (each one's tail is
        # dropped) must not depend on the number of processes.
        if self.packing:
            tokens = tokens.map(
                _pack,
                batched=True,
                fn_kwargs=dict(
                    cls_id=self.tokenizer.cls_token_id,
                    sep_id=self.tokenizer.sep_token_id,
                    max_length=self.max_length,
                ),
                **batches(f"Packing into blocks of {self.max_length}", PACK_BATCH),
            )
        return tokens.with_format(None)  # rows as Python lists, for the collator

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
        # A stream that makes no example would train on nothing, epoch after empty epoch:
        # read up to its first example (all of it, when there is none).
        for split, examples in (("train", self.train_set), ("validation", self.val_set)):
            if next(iter(examples), None) is None:
                raise UserError(self._why_empty(split, (row["text"] for row in raw[split])))
        if not self.packing:  # a stream cannot be counted ahead: its first lines tell
            first = [row["truncated"] for row in itertools.islice(self.train_set, STREAM_SAMPLE)]
            if any(first):
                log.warning(f"{sum(first)} of the first {len(first)} training lines are longer than data.max_length="
                            f"{self.max_length} tokens and are truncated (data.packing=true keeps all text)")
            self.train_set, self.val_set = (d.remove_columns("truncated") for d in (self.train_set, self.val_set))

    def _setup_tokenized(self):
        raw = self._raw()
        tokens = self._tokenized(raw)
        for split, ds in tokens.items():
            if len(ds) == 0:
                raise UserError(self._why_empty(split, raw[split]["text"]))
        if len(tokens["train"]) < self.batch_size:
            raise UserError(
                f"the training text makes {len(tokens['train'])} examples, fewer than one batch "
                f"(data.batch_size={self.batch_size}): add text or lower data.batch_size"
            )
        if not self.packing:
            # Summed in Arrow over the memory-mapped column: no Python bool per line.
            cut = pc.sum(tokens["train"].with_format("arrow")["truncated"]).as_py() or 0
            if cut:
                log.warning(
                    f"{cut} of {len(tokens['train'])} training lines are longer than "
                    f"data.max_length={self.max_length} tokens and were truncated (data.packing=true keeps all text)"
                )
            tokens = tokens.remove_columns("truncated")
        self.train_set, self.val_set = tokens["train"], self._bounded(tokens["validation"])

    def _bounded(self, val_set):
        """At most `val_max_blocks` validation blocks: a fixed sample (by the seed), the same
        for the validations before, during and after training, whatever the corpus size."""
        if self.val_max_blocks is None or len(val_set) <= self.val_max_blocks:
            return val_set
        return val_set.select(sorted(random.Random(self.seed).sample(range(len(val_set)), self.val_max_blocks)))

    def _why_empty(self, split: str, texts: Iterable) -> str:
        texts = list(texts)
        if not texts and self.streaming and split == "train":
            return (f"no training rows are left after the first data.val_rows={self.val_rows}, which are held out "
                    "for validation: lower data.val_rows or set data.val_files")
        if not any(isinstance(t, str) and t.strip() for t in texts):
            source = {"text": "data.val_files" if split == "validation" and self.val_files else "data.train_files",
                      "hub": "data.hub_dataset"}.get(self.corpus, "data.corpus")
            return f"the {split} data holds no text, only empty or blank rows: check {source}"
        return (f"the {split} text is shorter than one block of data.max_length={self.max_length} "
                "tokens: add text or lower data.max_length")

    def _workers(self) -> int:
        """data.num_workers, or for null what suits the run (workers.auto_num_workers): for a
        resumed run, its checkpoint's, whatever this machine's cores and GPUs."""
        if self.num_workers is not None:
            return self.num_workers
        if self._saved_workers is not None:
            return self._saved_workers
        if self.trainer is None:  # a loader on its own (benchmarks): as a run on this machine would
            return auto_num_workers(torch.cuda.is_available(), available_cores(), 1)
        gpu = not isinstance(self.trainer.accelerator, CPUAccelerator)
        return auto_num_workers(gpu, available_cores(), self.trainer.num_devices)

    def _loader(self, dataset, collator, train: bool, sampler=None) -> DataLoader:
        workers = self._workers()
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
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def token_counts(self, vocab_size: int, blocks: int = 10_000) -> np.ndarray | None:
        """(V,) occurrences of each token id in up to `blocks` training blocks spread evenly
        over the corpus; None for a stream, which cannot be sampled before training."""
        if self.streaming or not len(self.train_set):
            return None
        sample = self.train_set.select(range(0, len(self.train_set), -(-len(self.train_set) // blocks)))
        ids = pc.list_flatten(sample.with_format("arrow")["input_ids"]).to_numpy()
        return np.bincount(ids, minlength=vocab_size)[:vocab_size]

    def _shard(self) -> tuple[int, int]:
        """This rank and the number of ranks, as Lightning would give its DistributedSampler."""
        shard = (self.trainer and self.trainer.distributed_sampler_kwargs) or {}
        return shard.get("rank", 0), shard.get("num_replicas", 1)

    def train_dataloader(self) -> DataLoader:
        if self.streaming:  # shuffled through a buffer as it is read
            return self._loader(self.train_set, self.train_collator, train=True)
        # Under DDP the sampler takes this rank's share itself (Lightning's own would list
        # every example of an epoch in memory).
        sampler = EpochShuffle(len(self.train_set), self.seed, *self._shard())
        return self._loader(WithMaskSeeds(self.train_set, self.seed), self.train_collator, train=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        if self.streaming:  # split between the ranks as it is read
            return self._loader(self.val_set, self.val_collator, train=False)
        # Each block on one rank only: Lightning's sampler would make the shares equal by
        # repeating blocks, which validation's sums over all ranks would count twice. The
        # shares may differ by a batch: validation has no collective per batch.
        rank, ranks = self._shard()
        if len(self.val_set) < ranks:
            raise UserError(f"the validation set has fewer blocks ({len(self.val_set)}) than the run has processes "
                            f"({ranks}), each of which needs one: give more validation text (data.val_files, "
                            "data.val_percent)")
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=ranks, rank=rank, shuffle=False)
        return self._loader(self.val_set, self.val_collator, train=False, sampler=sampler)
