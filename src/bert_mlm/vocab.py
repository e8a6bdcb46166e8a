"""Your own vocabulary: a WordPiece tokenizer (what BERT uses) trained on the training text
with the `tokenizers` library, for pretraining from scratch on a new domain or language."""

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PositiveInt
from tokenizers import BertWordPieceTokenizer
from transformers import PreTrainedTokenizerFast

from bert_mlm.errors import UserError
from bert_mlm.launch import launched_world_size

SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
           "mask_token": "[MASK]"}
VocabSize = Annotated[int, Field(gt=len(SPECIAL))]  # room for more than the special tokens
# What a run folder's vocabulary was trained with, saved beside it.
TRAINED_WITH = "trained_with.json"


def train_wordpiece(texts: Iterable[str | list[str]], vocab_size: VocabSize, out_dir: Path,
                    min_frequency: PositiveInt = 2, lowercase: bool = True) -> Path:
    """Trains on `texts` (strings, or lists of them) and saves a transformers tokenizer into `out_dir`."""
    wordpiece = BertWordPieceTokenizer(lowercase=lowercase)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL.values()), show_progress=False)
    if wordpiece.get_vocab_size() > vocab_size:  # every character of the text is kept, whatever the size
        raise UserError(f"tokenizer.vocab_size={vocab_size} is below the {wordpiece.get_vocab_size()} tokens that "
                        "the training text's characters and the special tokens take: set it to at least that")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece._tokenizer, **SPECIAL)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_vocabulary(folder: Path, texts: Callable[[], Iterable[str | list[str]]], vocab_size: VocabSize,
                   min_frequency: PositiveInt, source: dict[str, Any], replace: bool = False) -> Path:
    """The vocabulary in `folder` (a run folder's tokenizer/): trained on `texts()`, or the one
    an earlier run there trained (a resume, a DDP rank started later, a run after prepare_only)
    if that had the same settings and text `source`; one trained otherwise is refused, or
    with `replace` (overwrite=true) trained again."""
    settings = {"tokenizer.vocab_size": vocab_size, "tokenizer.min_frequency": min_frequency, **source}
    record = folder / TRAINED_WITH
    if (folder / "tokenizer.json").exists():
        saved = json.loads(record.read_text()) if record.exists() else {}  # none from older runs
        if "data.train_files_bytes" not in saved:  # older records: the files by path and modification time
            saved.pop("data.train_files", None)
        changed = [f"{key}={value}" for key, value in saved.items() if settings.get(key) != value]
        if changed and not replace:
            raise UserError(f"{folder} holds a vocabulary trained with {', '.join(changed)}: use those settings, "
                            f"another run folder, or delete {folder} to train a new one")
        if not changed:
            return folder
    if launched_world_size() > 1:  # every process would train it and write it at once
        raise UserError("under torchrun or srun, train the tokenizer first in one process: the same command "
                        "without torchrun or srun, with prepare_only=true and the same hydra.run.dir")
    train_wordpiece(texts(), vocab_size, folder, min_frequency)
    record.write_text(json.dumps(settings, indent=2) + "\n")
    return folder
