"""`python -m fill_mask RUN_DIR_OR_MODEL "text with [MASK]" [--top-k K] [--device D]`: try a trained model.

RUN_DIR_OR_MODEL is a run folder (its hf_model/ is used), an exported model folder, a
.ckpt file or a hub name. With no text, reads one text per line from stdin."""

import argparse
import sys
from pathlib import Path

import torch
from huggingface_hub.utils import enable_progress_bars
from transformers import pipeline
from transformers.utils import logging as hf_logging

from bert_mlm import MLMModule, UserError
from bert_mlm.errors import refuse
from bert_mlm import pretrained


def load(source: str, device: str):
    path = Path(source)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise UserError(f"checkpoint {source} does not exist")
        # A run's own vocabulary (tokenizer.train) from its folder, wherever that has moved since.
        own = path.resolve().parent.parent / "tokenizer"
        kwargs = {"tokenizer": str(own)} if (own / "tokenizer.json").exists() else {}
        try:
            module = MLMModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
        except UserError as err:  # e.g. the model it continued (model.pretrained) is gone
            raise UserError(f"{source}: its run's {err}; its run folder's hf_model/, if there is one, "
                            "loads on its own") from err
        except Exception as err:  # not a checkpoint, or cut short: unusable alike
            raise UserError(f"{source} cannot be read as a checkpoint: give another .ckpt or the run folder") from err
        return pipeline("fill-mask", model=module.model.eval(), tokenizer=module.tokenizer, device=device)
    exported = path / "hf_model"
    if (exported / "model.safetensors").is_file() and (exported / "tokenizer_config.json").is_file():
        path = exported
    elif (path / "checkpoints" / "last.ckpt").is_file():  # a run still going, or stopped: its newest state
        print(f"{source} has no (whole) hf_model/ yet: using its checkpoints/last.ckpt", file=sys.stderr)
        return load(str(path / "checkpoints" / "last.ckpt"), device)
    elif (path / ".hydra").is_dir() or (path / "train.log").is_file():
        raise UserError(f"{source} is a run folder without a model yet: no hf_model/ and no checkpoints/last.ckpt "
                        "(the run saved none; or an overwrite=true killed early left it in .replaced/, "
                        "which its next run puts back)")
    elif (path / "summary.csv").is_file():
        raise UserError(f"{source} is a sweep folder: give one of its jobs' folders, e.g. {path / '0'}")
    try:
        return pipeline("fill-mask", model=pretrained.source(str(path)), device=device)
    except (OSError, ValueError) as err:  # no such model; a folder without one (no model_type)
        raise UserError(f"could not load a model from '{source}': give a run folder, a model folder, "
                        "a .ckpt or a hub name") from err


def _problem(text: str, fill) -> str | None:
    """Why `text` cannot be filled in, if it cannot."""
    mask = fill.tokenizer.mask_token
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        return f"{text!r} is not UTF-8 text: convert it (e.g. with iconv)"
    if mask not in text:
        return f"no {mask} in {text!r}: put {mask} where a word should be predicted"
    tokens, most = len(fill.tokenizer(text)["input_ids"]), fill.model.config.max_position_embeddings
    if tokens > most:
        return f"{text[:40]!r}... is {tokens} tokens: the model reads at most {most}; shorten it"
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line, as for every other bad input
        refuse(f"{message} (python -m fill_mask --help)")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m fill_mask", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run folder, model folder, .ckpt or hub name")
    parser.add_argument("text", nargs="*", help="texts with [MASK]; none: read lines from stdin")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: the GPU when one is visible")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k={args.top_k}: input should be greater than 0")
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar, a blink before every answer...
    enable_progress_bars()  # ...but a hub model's download keeps its bar
    try:
        # (line number or None, text): lines of stdin are numbered, for what is skipped.
        texts = [(None, t) for t in args.text] or [(n, line.strip()) for n, line in enumerate(sys.stdin, 1)
                                                   if line.strip()]
        if not texts:
            raise UserError("no text: give one with [MASK] after the model, or lines of them on stdin")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda but no GPU is visible: use --device cpu")
        device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        fill = load(args.model, device)
        skipped = []
        for line, text in texts:
            problem = _problem(text, fill)
            if problem and line is None:
                raise UserError(problem)
            if problem:  # one bad line of a file does not stop the others
                skipped.append(f"line {line}: {problem}")
                continue
            print(text)
            results = fill(text, top_k=min(args.top_k, fill.model.config.vocab_size))
            # One list per [MASK] when there are several, a flat list when there is one.
            for i, predictions in enumerate(results if isinstance(results[0], list) else [results]):
                guesses = ", ".join(f"{p['token_str']} ({p['score']:.3f})" for p in predictions)
                print(f"  [MASK] {i + 1}: {guesses}")
        if skipped:
            raise UserError(f"{len(skipped)} of {len(texts)} lines skipped; {'; '.join(skipped)}")
    except UserError as err:
        refuse(err)


if __name__ == "__main__":
    main()
