"""`make bench` runs end to end (at a tiny size: its figures are for the README, not for tests)."""

import json
import subprocess
import sys

from conftest import ROOT


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
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["ours", "hf-bf16", "hf-fp32"]
    results = json.loads(out.read_text())["results"]
    for runner in ("ours", "hf-bf16", "hf-fp32"):
        (r,) = results[runner]
        assert r["tokens_per_sec"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["val_loss"] < 20
    assert results["hf-bf16"][0]["precision"] == "bf16-mixed"


def test_bench_on_the_same_batches(tmp_path):
    proc = bench(tmp_path, "--runners", "hf-fp32", "--same-batches")
    assert "the same batches" in proc.stdout
    assert [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")][1:] == ["hf-fp32"]
