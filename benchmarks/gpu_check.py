"""`make gpu-check`: everything that needs an NVIDIA GPU, in one command of under 10 minutes.

1. the tests marked `gpu`: trainer=gpu, trainer=mixed and trainer=ddp (all visible GPUs),
   kill -9 and exact resume, fill_mask on the GPU;
2. BERT-base (seq 128, bf16): ours against the Hugging Face Trainer recipe (bench.py);
3. the largest per-GPU batch of ours that fits, with its peak memory;
4. a profile of ours: how busy the GPU is and how often the host waits for it.

It prints one table and writes it, with each step's output, into --out. It needs no network
and no packaged model: the tests and benchmarks build their models from scratch and need only
the tokenizer files.

    python benchmarks/gpu_check.py [--out gpu-check] [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import WIKITEXT  # noqa: E402


def corpus(path: Path, megabytes: int) -> Path:
    """Text enough for batches of 1,024 blocks: WikiText-2 (when here) or the Python docs,
    repeated. For speed only: a model would learn the repeats."""
    if WIKITEXT.exists():
        text = WIKITEXT.read_text()
    else:
        from pydoc_data.topics import topics

        text = "\n".join(topics.values())
    path.write_text(text * (megabytes * 2**20 // len(text.encode()) + 1))
    return path


def run(name: str, command: list[str], out: Path, timeout: int) -> tuple[bool, str, float]:
    """Runs one step, its output into out/NAME.log: (succeeded, output, seconds)."""
    print(f"{name} ...", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        ok, output = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        ok, output = False, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s"
    (out / f"{name}.log").write_text(output)
    return ok, output, time.perf_counter() - start


def bench_result(path: Path, runner: str = "ours") -> dict | None:
    if not path.is_file():
        return None
    results = json.loads(path.read_text())["results"]
    return max(results[runner], key=lambda r: r["tokens_per_sec"]) if results.get(runner) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the table and the logs")
    parser.add_argument("--batch", type=int, default=32, help="the benchmark's batch (as issue 13 sets it)")
    parser.add_argument("--size", default="base", help="the model size (bench.py --size)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and batch sizes (a trial of this script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.quick:
        sys.exit("error: no GPU is visible: make gpu-check is for machines with NVIDIA GPUs")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # the corpus and its token cache: not results
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--size", args.size, "--seq", "128",
             "--text", str(corpus(scratch / "corpus.txt", 2 if args.quick else 8)), "--cache-dir", str(scratch)]
    hf = "hf-bf16" if torch.cuda.is_available() else "hf-fp32"
    rows = [("machine", "", f"{torch.cuda.device_count()} x {gpu}, torch {torch.__version__}, "
                            f"CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores")]

    # 1. The GPU tests, one row each.
    junit = out / "gpu-tests.xml"
    run("gpu-tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q",
                      f"--junitxml={junit}"], out, timeout=330)
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            status = "skipped" if case.find("skipped") is not None else "FAILED" if failed else "passed"
            rows.append((case.get("name"), status, f"{float(case.get('time', 0)):.0f} s"))
    else:
        rows.append(("GPU tests", "FAILED", "no report: see gpu-tests.log"))

    # 2. BERT-base: ours against the Hugging Face recipe in bf16 (SDPA attention in both).
    name = f"{args.size} vs HF"
    steps = ["--steps", "5", "--warmup", "2"] if args.quick else ["--steps", "30", "--warmup", "5"]
    workers = f"data.num_workers={min(8, (os.cpu_count() or 2) - 1)}"
    ok, output, seconds = run("bench", [*bench, "--batch", str(args.batch), "--rounds", "1", *steps,
                                             "--runners", f"ours,{hf}", "--ours", workers,
                                             "--out", str(out / "bench.json")], out, timeout=300)
    rows.append((name, "passed" if ok else "FAILED", f"{seconds:.0f} s: the table below"))
    details = [line for line in output.splitlines() if line.startswith(("|", "(TFLOP/s", "model FLOPs"))]

    # 3. The largest batch that fits: doubling until the run fails (out of memory).
    largest = None
    for batch in (64, 128) if args.quick else (64, 128, 256, 512, 1024):
        path = out / f"batch-{batch}.json"
        ok, _, _ = run(f"batch-{batch}", [*bench, "--batch", str(batch), "--rounds", "1", "--steps", "3",
                                          "--warmup", "2", "--runners", "ours", "--ours", workers,
                                          "--out", str(path)], out, timeout=120)
        if not ok:
            break
        largest = (batch, bench_result(path))
    if largest:
        batch, r = largest
        rows.append(("largest batch that fits", str(batch), f"{r['tokens_per_sec']:,.0f} tokens/s, "
                                                            f"peak {r['peak_memory_gb']:.1f} GB"))
    else:
        rows.append(("largest batch that fits", "FAILED", "not even 64: see batch-64.log"))

    # 4. Where the time goes (profiled, so slower than the benchmark).
    ok, output, _ = run("profile", [*bench, "--batch", str(args.batch), "--rounds", "1", *steps, "--runners",
                                    "ours", "--ours", workers, "--profile"], out, timeout=180)
    rows.append(("profile", "passed" if ok else "FAILED", "below"))
    details += [""] + [line for line in output.splitlines() if line.startswith(("profile of", "time per step"))]

    lines = ["| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {name} | {status} | {detail} |" for name, status, detail in rows]
    lines += ["", *details]
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out / 'gpu-check.md'}")
    if any(status == "FAILED" for _, status, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
