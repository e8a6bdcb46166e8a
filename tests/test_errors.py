"""Bad input ends with one `error:` line on stderr, a non-zero exit and nothing lost."""

import pytest
import torch

from conftest import SMOKE, last_error, run_train

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short for a block.\n")
    (tmp_path / "data.csv").write_text("id,body\n" + "".join(f"{i},{TEXT}\n" for i in range(50)))
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
    "hub model offline": (["model=bert-base-uncased"], "model=minilm"),
    "checkpoint missing": (["ckpt_path={d}/none.ckpt"], "ckpt_path"),
    "endless training": (["trainer.max_steps=-1"], "trainer.max_steps"),
    "no GPU": (["trainer=gpu"], "trainer=cpu"),
    "streaming without max_steps": (["data.streaming=true", "trainer.max_steps=-1"], "trainer.max_steps"),
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
    proc = run_train(run_dir, *SMOKE, f"data.cache_dir={tmp_path / 'cache'}",
                     *(o.format(d=d) for o in overrides))
    last = last_error(proc)
    assert last.startswith("error: ") and needle in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (run_dir / "keep.txt").read_text() == "earlier work"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()
