"""Your own vocabulary: a WordPiece tokenizer (what BERT uses) trained on the training text
with the `tokenizers` library, for pretraining from scratch on a new domain or language."""

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from pydantic import Field, PositiveInt
from tokenizers import BertWordPieceTokenizer
from transformers import PreTrainedTokenizerFast

SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
           "mask_token": "[MASK]"}
VocabSize = Annotated[int, Field(gt=len(SPECIAL))]  # room for more than the special tokens


def train_wordpiece(texts: Iterable[str], vocab_size: VocabSize, out_dir: Path, min_frequency: PositiveInt = 2,
                    lowercase: bool = True) -> Path:
    """Trains on `texts` and saves a transformers tokenizer into `out_dir` (returned)."""
    wordpiece = BertWordPieceTokenizer(lowercase=lowercase)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL.values()), show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece._tokenizer, **SPECIAL)
    tokenizer.save_pretrained(out_dir)
    return out_dir
