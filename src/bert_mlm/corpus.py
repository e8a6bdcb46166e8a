"""The raw text: a DatasetDict with `train` and `validation` splits and one `text` column."""

import codecs
import logging
from pathlib import Path

import datasets

from bert_mlm.errors import UserError, find_cause
from bert_mlm.hub import hub_reachable

Corpus = datasets.DatasetDict | datasets.IterableDatasetDict
log = logging.getLogger(__name__)

# `datasets` builder for each file type data=text accepts.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Rows per Arrow record batch of the cached text, and of a split's row indices (8 bytes a row):
# every process that opens a cached file reads each record batch's header, and the kernel maps
# in the pages around it, so with `datasets`' 1000 rows a batch a quarter of the text, and all
# of the indices, stayed in its RSS (data.py says more). The text builder also cuts its batches
# at 10 MB chunks of text.
TEXT_BATCH, INDEX_BATCH = 100_000, 1_000_000


def _pydocs_paragraphs(split: str):
    from pydoc_data.topics import topics

    # A fixed split by topic: every 10th topic (in sorted order) is validation.
    for i, name in enumerate(sorted(topics)):
        if (i % 10 == 9) == (split == "validation"):
            for paragraph in topics[name].split("\n\n"):
                if paragraph.strip():
                    yield {"text": " ".join(paragraph.split())}


def pydocs(cache_dir: str | None, streaming: bool = False) -> Corpus:
    """CPython's bundled reference docs (`pydoc_data.topics`, ~465 kB): always offline."""
    splits = {
        split: datasets.Dataset.from_generator(
            _pydocs_paragraphs, gen_kwargs={"split": split}, cache_dir=cache_dir
        )
        for split in ("train", "validation")
    }
    if streaming:
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in splits.items()})
    return datasets.DatasetDict(splits)


def _builder(files: list[str]) -> str:
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"data file '{f}' does not exist: check data.train_files / data.val_files")
        if Path(f).stat().st_size == 0:
            raise UserError(f"data file '{f}' is empty: add text or leave it out of data.train_files / data.val_files")
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - BUILDERS.keys()
    if unknown:
        raise UserError(
            f"data files of type {sorted(unknown)} are not supported: use one of {sorted(BUILDERS)}"
        )
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise UserError(f"data files mix types {sorted(suffixes)}: use files of one type")
    return builders.pop()


def _first_not_utf8(files: list[str]) -> tuple[str, int] | None:
    """The first of `files` that is not UTF-8, and the byte where it stops being so. Only on
    the error's path: `datasets` reports the byte within the chunk it was reading, not the file."""
    for name in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    return name, offset + err.start
                offset += len(chunk)
    return None


def not_utf8(err: UnicodeDecodeError, files: list[str]) -> UserError:
    """Read at once, or (data.streaming=true) as the stream reaches it."""
    found = _first_not_utf8(files)
    where = f"data file '{found[0]}' is not UTF-8 text (at byte {found[1]:,})" if found else (
        f"a data file is not UTF-8 text ({err.reason})")
    return UserError(f"{where}: convert it, e.g. iconv -f latin1 -t utf-8, or leave it out of "
                     "data.train_files / data.val_files")


def check_files(corpus: str, train_files: list | None, val_files: list | None) -> None:
    """Files go with data=text, which needs them (checked with the config, before anything is written)."""
    if corpus != "text" and (train_files or val_files):  # else silently not read
        raise UserError(f"data.train_files and data.val_files are read with data=text, not with this "
                        f"run's data={corpus}: add data=text")
    if corpus == "text" and not train_files:
        raise UserError("data=text needs files: set data.train_files=[a.txt,b.txt]")


def text_files(
    train_files: list[str], val_files: list[str] | None, cache_dir: str | None, streaming: bool = False
) -> Corpus:
    """Local .txt (one example per line), .json/.jsonl, .csv or .parquet files."""
    data_files = {"train": list(train_files)}
    if val_files:
        data_files["validation"] = list(val_files)
    if len(set(map(str, train_files))) < len(train_files):
        log.warning("data.train_files names a file twice: its text is trained on twice as often")
    if val_files and set(map(str, val_files)) & set(map(str, train_files)):
        log.warning("data.val_files and data.train_files share files: validation then measures text the "
                    "model trains on, not how it does on unseen text")
    every_file = [f for files in data_files.values() for f in files]
    builder = _builder(every_file)
    try:
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, streaming=streaming,
                                     writer_batch_size=TEXT_BATCH)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = find_cause(err, UnicodeDecodeError)
        if cause is not None:
            raise not_utf8(cause, every_file) from err
        raise UserError(f"could not read data files {data_files}: {err}") from err


def hub(name: str, config: str | None, cache_dir: str | None, streaming: bool = False) -> Corpus:
    """A dataset from the Hugging Face hub, e.g. wikitext / wikitext-103-raw-v1."""
    online = hub_reachable()
    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir, streaming=streaming,
                                     writer_batch_size=TEXT_BATCH)
    except Exception as err:  # offline, unknown name or config: all end the same way
        where = "from the hub" if online else "from the local cache (the hub is unreachable)"
        raise UserError(
            f"could not load data.hub_dataset={name} with data.hub_config={config} {where}: "
            f"{type(err).__name__}; check both (hub_config: one of the dataset's configs, or null), "
            "or offline use data=pydocs or data=text with local files"
        ) from err


def _column_kind(split: datasets.Dataset | datasets.IterableDataset, column: str) -> str | None:
    """The type of a column's values ("string" for text); None where it is not known
    (a stream that declares no features, or holds no rows)."""
    feature = (split.features or {}).get(column)
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if feature is not None:
        return type(feature).__name__  # a list, a dict, ...
    if isinstance(split, datasets.IterableDataset):  # its first row tells
        first = next(iter(split), {}).get(column)
        return None if first is None or isinstance(first, str) else type(first).__name__
    return None


def with_validation(
    raw: Corpus, text_column: str, val_percent: float, val_rows: int, seed: int
) -> Corpus:
    """Keeps only the text column (renamed `text`) and splits off validation if there is none:
    `val_percent` of the rows, or when streaming (length unknown) the first `val_rows`."""
    train = raw["train"]
    streaming = isinstance(train, datasets.IterableDataset)
    try:  # a stream may not know its columns before it is read
        columns = train.column_names or list(next(iter(train)))
    except StopIteration:
        columns = []
    if not columns or (not streaming and len(train) == 0):
        raise UserError("the training data is empty: check data.train_files")
    if text_column not in columns:
        raise UserError(f"the data has no column '{text_column}' (it has {columns}): set data.text_column")
    for name, rows in raw.items():
        kind = _column_kind(rows, text_column)
        if kind == "Json" and isinstance(rows, datasets.Dataset):  # text in most rows, other values in some
            row, value = next((i, v) for i, v in enumerate(rows[text_column]) if not isinstance(v, str))
            raise UserError(f"row {row + 1} of the {name} data holds {value!r} in column '{text_column}', "
                            "where every row needs text: fix or drop that row")
        if kind not in ("string", "large_string", None):
            raise UserError(f"the {name} data's column '{text_column}' holds {kind} values, not text: "
                            "set data.text_column to the column with the text")
    if "validation" in raw:
        validation = raw["validation"]
    elif streaming:
        train, validation = train.skip(val_rows), train.take(val_rows)
    else:
        try:
            split = train.train_test_split(test_size=val_percent / 100, seed=seed, writer_batch_size=INDEX_BATCH)
        except ValueError as err:  # too few rows to leave some on both sides
            raise UserError(f"the training data has {len(train)} rows, too few to hold out "
                            f"data.val_percent={val_percent}% for validation: add text or set data.val_files") from err
        train, validation = split["train"], split["test"]
    kind = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
    out = kind({"train": train, "validation": validation}).select_columns([text_column])
    return out.rename_column(text_column, "text") if text_column != "text" else out
