"""`make bench-data` at a tiny size, its measurements run in this process (the script runs
each in a process of its own, which would cost seconds of imports apiece here)."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_data  # noqa: E402


def test_bench_data_measures_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_data.main(["--mb", "0.3", "--small-mb", "0.1", "--procs", "1", "--workers", "0", "--seconds", "0.3",
                     "--steps", "2", "--seq", "64", "--batch", "8", "--cache-dir", str(tmp_path), "--out", str(out)],
                    run=bench_data.measure_here)
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [cells[0].strip() for cells in table[1:]] == [
        "prepare: ours, num_proc=1", "prepare: run_mlm.py, num_proc=1", "loader: ours, num_workers=0",
        "GPU need: BERT-base at 50% MFU on an H100", "train 2 steps, tiny model: 0.1 MB",
        "train 2 steps, tiny model: 0.3 MB",
    ]
    rows = json.loads(out.read_text())["rows"]
    ours, hf, loader, need, small, large = rows
    assert ours["seconds"] > 0 and hf["seconds"] > 0
    # The same text in blocks of 64 both ways (run_mlm.py's hold a [CLS] and [SEP] per line, ours per block).
    assert 0.8 < ours["blocks"] / hf["blocks"] < 1.1
    assert float(table[1][1].split()[0]) == pytest.approx(0.3 / ours["seconds"], rel=0.05)  # MB/s
    assert table[1][2].strip() == f"{hf['seconds'] / ours['seconds']:.2f}x run_mlm.py"
    assert loader["sequences_per_sec"] > 0 and need["sequences_per_sec"] > 0
    assert all(r["peak_rss_gb"] > 0 for r in (ours, hf, loader, small, large))
    growth = bench_data.rss_growth(small["peak_rss_gb"], large["peak_rss_gb"])[0]
    anon, within = bench_data.rss_growth(small["peak_anon_gb"], large["peak_anon_gb"])
    assert table[-1][2].strip() == f"RSS {growth:+.1%}, anon {anon:+.1%} ({'within' if within else 'over'} 10%)"
    assert 0 < large["peak_anon_gb"] < large["peak_rss_gb"]


def test_the_gpu_need_is_that_of_bert_base_on_an_h100():
    # 50% of 989 TFLOP/s over ~545 MFLOPs a token (the MLM head on 15% of them), 128 tokens a sequence.
    assert bench_data.gpu_need(128)[1] == pytest.approx(7084, rel=0.01)


def test_rss_growth_is_checked_against_the_tolerance():
    assert bench_data.rss_growth(1.0, 1.05) == (pytest.approx(0.05), True)
    assert bench_data.rss_growth(1.0, 1.2) == (pytest.approx(0.2), False)
    assert bench_data.rss_growth(1.0, 0.9)[1]  # less memory on the large corpus is fine
