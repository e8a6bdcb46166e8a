"""`make bench-quality` runs end to end (at a tiny size, a 2-second budget per recipe: its
figures are for the README, not for tests), and its time-to-reach figure is interpolated."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import WIKITEXT  # noqa: E402
from bench_quality import default_texts, time_to_reach  # noqa: E402


def test_time_to_reach_interpolates_between_scored_points():
    curve = [(0.0, 10.0), (100.0, 6.0), (200.0, 5.0)]
    assert time_to_reach(curve, 8.0) == pytest.approx(50.0)
    assert time_to_reach(curve, 5.5) == pytest.approx(150.0)
    assert time_to_reach(curve, 10.0) == 0.0
    assert time_to_reach(curve, 4.9) is None
    # Not the first point under the target: the first time the curve gets there.
    assert time_to_reach([(0.0, 10.0), (10.0, 7.0), (20.0, 9.0), (30.0, 6.0)], 8.0) == pytest.approx(20 / 3)


@pytest.mark.parametrize("corpus", ["pydocs", "wikitext"])
def test_text_on_hand_splits_into_disjoint_training_and_held_out_files(tmp_path, corpus):
    if corpus == "wikitext" and not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} is not here")
    train, heldout = (path.read_text() for path in default_texts(tmp_path, corpus))
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.15
    # Whole documents are held out: their lines (but stock phrases) are not trained on.
    lines = {line for line in heldout.splitlines() if len(line) > 60}
    assert len(lines - set(train.splitlines())) > 0.8 * len(lines) > 0


def test_bench_quality_scores_every_saved_model(tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    (tmp_path / "train.txt").write_text("\n".join(texts[1:12]))
    (tmp_path / "heldout.txt").write_text("\n".join(texts[40:42]))
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--model=tiny", "--budget=2", "--saves=2",
         "--hf-lrs=5e-4", "--batch=4", "--seq=32", f"--train={tmp_path / 'train.txt'}",
         f"--heldout={tmp_path / 'heldout.txt'}", "--common=data.num_proc=1 data.num_workers=0",
         f"--cache-dir={tmp_path / 'cache'}", f"--out={out}"],
        # One thread: a model this small gains nothing from two, and they stall on a busy CPU.
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert set(runs) == {"ours", "hf-lr5e-4"}
    for name, run in runs.items():
        snaps = run["snapshots"]
        assert snaps and all(math.isfinite(s["loss"]) and 0 < s["loss"] < 20 for s in snaps), name
        seconds = [s["seconds"] for s in snaps]
        assert seconds == sorted(seconds), name
        # Trained to the end of the budget (HF: or of the steps timed to fit in it).
        assert seconds[-1] >= 2 or snaps[-1]["step"] == run.get("max_steps"), name
        rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == len(snaps), name
    assert runs["ours"]["lr"] == 1e-3 and runs["hf-lr5e-4"]["max_steps"] >= 1  # model=tiny's lr; HF's timed steps
    # The time to reach the best Hugging Face loss, from the scored points.
    target = min(s["loss"] for s in runs["hf-lr5e-4"]["snapshots"])
    curve = [(0.0, result["initial_loss"])] + [(s["seconds"], s["loss"]) for s in runs["ours"]["snapshots"]]
    reached = time_to_reach(curve, target)
    expected = (f"this project reaches the best Hugging Face loss, {target:.3f}" if reached is not None else
                f"this project does not reach the best Hugging Face loss, {target:.3f}")
    assert expected in proc.stdout
    if reached is not None:
        assert f"after {reached:.0f} s" in proc.stdout
