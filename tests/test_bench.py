"""`make bench` runs end to end (at a tiny size: its figures are for the README, not for tests)."""

import json
import subprocess
import sys

import pytest

from bert_mlm.launch import cpu_has_native_bf16
from conftest import ROOT

pytestmark = pytest.mark.bf16


def bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--size", "tiny", "--steps", "2",
         "--warmup", "2", "--rounds", "1", "--batch", "4", "--seq", "32",
         "--cache-dir", str(tmp_path / "cache"), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_runs_and_compares(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench(tmp_path, "--out", str(out))
    # The Hugging Face recipe in bf16 only where bf16 is native; else it would take many minutes.
    runners = ["ours", "hf-bf16", "hf-fp32"] if cpu_has_native_bf16() else ["ours", "hf-fp32"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == runners
    assert ("bf16 runs and the bf16 peak are left out" in proc.stdout) != cpu_has_native_bf16()
    result = json.loads(out.read_text())
    for runner in runners:
        (r,) = result["results"][runner]
        assert r["tokens_per_sec"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["val_loss"] < 20
    assert result["results"]["ours"][0]["precision"] == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
    assert all(result["results"][r][0]["peak_flops"] > 0 for r in runners)  # MFU's yardstick, per run
    # Ratios are against the fastest Hugging Face runner.
    best_hf = max(result["results"][r][0]["tokens_per_sec"] for r in runners if r.startswith("hf"))
    ratio = float(rows[1].split("|")[4])
    assert ratio == pytest.approx(result["results"]["ours"][0]["tokens_per_sec"] / best_hf, abs=0.006)


def test_bench_on_the_same_batches(tmp_path):
    proc = bench(tmp_path, "--runners", "hf-fp32", "--same-batches")
    assert "the same batches" in proc.stdout
    assert [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")][1:] == ["hf-fp32"]
