"""`make gpu-check`: everything that needs an NVIDIA GPU, in one command of under 10 minutes.

1. the tests marked `gpu`: trainer=gpu, trainer=mixed and trainer=ddp (all visible GPUs),
   kill -9 and exact resume, fill_mask on the GPU;
2. BERT-base (seq 128, bf16): ours against the Hugging Face Trainer recipe (bench.py);
3. the largest per-GPU batch of ours that fits, with its peak memory;
4. a profile of ours: how busy the GPU is and how often the host waits for it;
5. the training DataLoader's sequences/s with 0 workers up to the default and the cores
   (bench_data.py), next to what a GPU needs.

It prints one table and writes it, with each step's output, into --out, rewriting the table
after each step, so that a run cut short keeps what it measured. `--only` picks steps, e.g.
for a machine lent by the call of at most 10 minutes: `--only tests,bench`, then
`--only batch,profile,loader`. It needs no network and no packaged model: the tests and
benchmarks build their models from scratch and need only the tokenizer files.

    python benchmarks/gpu_check.py [--out gpu-check] [--only tests,bench,...] [--quick]
"""

import argparse
import importlib.util
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

from bert_mlm.workers import auto_num_workers, available_cores  # noqa: E402

STEPS = ("tests", "bench", "batch", "profile", "loader")


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
    """Runs one step, its output into out/NAME.log as it comes (a step cut short by the
    time-out, or by the machine's, keeps what it printed): (succeeded, output, seconds)."""
    print(f"{name} ...", flush=True)
    log, start = out / f"{name}.log", time.perf_counter()
    with log.open("w") as file:
        try:
            ok = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                     "PYTHONUNBUFFERED": "1"}).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
            print(f"\ntimed out after {timeout} s", file=file)
    return ok, log.read_text(), time.perf_counter() - start


def bench_result(path: Path, runner: str = "ours") -> dict | None:
    if not path.is_file():
        return None
    results = json.loads(path.read_text())["results"]
    return max(results[runner], key=lambda r: r["tokens_per_sec"]) if results.get(runner) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the table and the logs")
    parser.add_argument("--batch", type=int, default=256, help="the benchmark's batch (the fastest measured on an H200)")
    parser.add_argument("--size", default="base", help="the model size (bench.py --size)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"which of {','.join(STEPS)} to run")
    parser.add_argument("--quick", action="store_true", help="fewer steps and batch sizes (a trial of this script)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(STEPS):
        sys.exit(f"error: --only {args.only}: the steps are {','.join(STEPS)}")
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
    details: list[str] = []

    def write() -> None:
        lines = ["| check | result | detail |", "| --- | --- | --- |"]
        lines += [f"| {name} | {status} | {detail} |" for name, status, detail in rows]
        (out / "gpu-check.md").write_text("\n".join([*lines, "", *details]) + "\n")

    if "tests" in only:
        tests(out, rows)
        write()
    default_workers = auto_num_workers(True, available_cores(), 1)  # what a one-GPU run gets
    workers = f"data.num_workers={default_workers}"
    steps = ["--steps", "5", "--warmup", "2"] if args.quick else ["--steps", "30", "--warmup", "5"]
    compiled = "" if args.quick else " model.compile=true"  # a minute of compiling on a GPU machine's cores
    if "bench" in only:  # BERT-base: ours compiled against the Hugging Face recipe in bf16 (SDPA attention in both)
        ok, output, seconds = run("bench", [*bench, "--batch", str(args.batch), "--rounds", "1", *steps,
                                            "--runners", f"ours,{hf}", "--ours", f"{workers}{compiled}",
                                            "--out", str(out / "bench.json")], out, timeout=260)
        rows.append((f"{args.size} vs HF", "passed" if ok else "FAILED", f"{seconds:.0f} s: the table below"))
        details += [line for line in output.splitlines() if line.startswith(("|", "(TFLOP/s", "model FLOPs"))]
        write()
    if "batch" in only:
        rows.append(largest_batch(bench, workers, out, (64, 128) if args.quick else (1024, 2048, 4096)))
        write()
    if "profile" in only:  # where the time goes (profiled, so slower than the benchmark)
        ok, output, _ = run("profile", [*bench, "--batch", str(args.batch), "--rounds", "1", *steps, "--runners",
                                        "ours", "--ours", workers, "--profile"], out, timeout=180)
        rows.append(("profile", "passed" if ok else "FAILED", "below"))
        details += [""] + [line for line in output.splitlines() if line.startswith(("profile of", "time per step"))]
        write()
    if "loader" in only:
        ok, output, seconds = loader(scratch, out, args.quick, default_workers)
        rows.append(("DataLoader", "passed" if ok else "FAILED", f"{seconds:.0f} s: the table below"))
        details += [""] + [line for line in output.splitlines() if line.startswith(("|", "corpus:"))]
        write()

    print((out / "gpu-check.md").read_text(), end="")
    print(f"written to {out / 'gpu-check.md'}")
    if any(status == "FAILED" for _, status, _ in rows):
        sys.exit(1)


def tests(out: Path, rows: list) -> None:
    """The tests marked gpu, one row each."""
    junit = out / "gpu-tests.xml"
    # Side by side where pytest-xdist is installed: one after another they had not finished
    # after 190 s on an H200, where each uses a sliver of the GPU.
    parallel = ["-n", "5"] if importlib.util.find_spec("xdist") else []
    run("gpu-tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "--durations=0",
                      *parallel, f"--junitxml={junit}"], out, timeout=330)
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            status = "skipped" if case.find("skipped") is not None else "FAILED" if failed else "passed"
            rows.append((case.get("name"), status, f"{float(case.get('time', 0)):.0f} s"))
    else:
        rows.append(("GPU tests", "FAILED", "no report: see gpu-tests.log"))


def largest_batch(bench: list[str], workers: str, out: Path, batches: tuple[int, ...]) -> tuple[str, str, str]:
    """Doubling the batch until a run fails (out of memory): the largest that ran."""
    largest = None
    for batch in batches:
        path = out / f"batch-{batch}.json"
        ok, _, _ = run(f"batch-{batch}", [*bench, "--batch", str(batch), "--rounds", "1", "--steps", "3",
                                          "--warmup", "2", "--runners", "ours", "--ours", workers,
                                          "--out", str(path)], out, timeout=120)
        if not ok:
            break
        largest = (batch, bench_result(path))
    if not largest:
        return ("largest batch that fits", "FAILED", f"not even {batches[0]}: see batch-{batches[0]}.log")
    batch, r = largest
    return ("largest batch that fits", str(batch), f"{r['tokens_per_sec']:,.0f} tokens/s, peak {r['peak_memory_gb']:.1f} GB")


def loader(scratch: Path, out: Path, quick: bool, default_workers: int) -> tuple[bool, str, float]:
    """The DataLoader's sequences/s from 0 workers to the default (data.num_workers=null with
    one GPU) and all cores but one: how the masking scales with the cores."""
    workers = {0, 1, 2, default_workers, max(1, available_cores() - 1)}
    return run("loader", [sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--only", "loader",
                          "--mb", "20" if quick else "50", "--seconds", "2" if quick else "5",
                          "--workers", ",".join(map(str, sorted(workers))), "--cache-dir", str(scratch / "data")],
               out, timeout=240)


if __name__ == "__main__":
    main()
