"""`make bench-quality`: held-out masked-LM loss against training time, this project against
the Hugging Face recipe (Trainer + DataCollatorForLanguageModeling + BertForMaskedLM, as in
transformers' run_mlm.py) at lr 5e-5 and 5e-4. Each recipe trains for the same wall-clock
budget on the same machine, one after another, from the same initial weights, and saves its
model along the way; one evaluator then scores every saved model on the held-out text with the
same fixed masks (HF's forward in fp32). It prints loss against training time for each recipe,
and when this project reaches the best loss any Hugging Face run reached.

    python benchmarks/bench_quality.py [--budget 240] [--train FILE --heldout FILE] [--model minilm] ...

This project runs first, as `python -m train` with trainer.max_time in a process of its own
(its validations and checkpoint writes count in its time); its saved models are its periodic
checkpoints (callbacks.last). The Hugging Face runs follow in this process, one after another.
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from bench import ROOT, WIKITEXT, val_loss

HF_LRS = "5e-5,5e-4"  # run_mlm.py's default, and the rate this project trains at


def default_texts(folder: Path, corpus: str) -> tuple[Path, Path]:
    """Training and held-out files from text on hand: WikiText-2's validation split cut at an
    article heading (the last ~5% of articles held out), or Python's docs (every 10th topic
    held out). Nothing here was used to tune this project's defaults on WikiText."""
    folder = folder / corpus
    folder.mkdir(parents=True, exist_ok=True)
    train, heldout = folder / "train.txt", folder / "heldout.txt"
    if corpus == "wikitext":
        lines = WIKITEXT.read_text().splitlines()
        heading = re.compile(r"^ = [^=].* = $")  # " = Title = ": an article starts
        cut = next(i for i in range(int(len(lines) * 0.95), len(lines)) if heading.match(lines[i]))
        parts = lines[:cut], lines[cut:]
    else:
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
        parts = ([t for i, t in enumerate(texts) if i % 10], texts[::10])
    for path, part in zip((train, heldout), parts):
        path.write_text("\n".join(part) + "\n")
    return train, heldout


def overrides(args) -> list[str]:
    """The settings every recipe shares: data, model (its initial weights: the same seed)."""
    return [f"model={args.model}", "data=text", f"data.train_files=[{args.train}]",
            f"data.val_files=[{args.heldout}]", f"data.max_length={args.seq}", f"data.batch_size={args.batch}",
            f"seed={args.seed}", f"data.cache_dir={Path(args.cache_dir) / 'datasets'}", *args.common.split()]


def build(args):
    """This project's module (the initial weights) and data module (the blocks, and the
    held-out ones with their fixed masks), as `python -m train` builds them."""
    from hydra import compose, initialize_config_dir
    from train import build as build_run

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides(args), f"output_dir={args.cache_dir}", "logger=none"])
    module, datamodule, _ = build_run(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return module, datamodule


def run_ours(args) -> dict:
    """`python -m train` with a time budget, keeping a checkpoint every budget/saves seconds."""
    run_dir = Path(args.cache_dir) / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    every_minutes = args.budget / args.saves / 60
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", *overrides(args), "trainer.max_steps=-1",
         f"trainer.max_time={{seconds: {args.budget}}}", f"callbacks.last.every_minutes={every_minutes}",
         f"callbacks.last.keep_periodic={4 * args.saves}", *args.ours.split()],
        capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode:
        sys.exit(f"error: this project's run failed:\n{proc.stderr[-3000:]}")
    snapshots = {}
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        if path.name.startswith(("step", "last")):  # the best-by-val/loss one is one of these
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            seconds = ckpt["callbacks"]["Timer"]["time_elapsed"]["train"]
            snapshots[ckpt["global_step"]] = {"seconds": seconds, "step": ckpt["global_step"], "path": str(path)}
    return {"snapshots": sorted(snapshots.values(), key=lambda s: s["step"]),
            "command_s": time.perf_counter() - start, "lr": ckpt["hyper_parameters"]["lr"]}


def initial_model(module) -> BertForMaskedLM:
    """A Hugging Face BertForMaskedLM with the weights this project's run starts from."""
    model = BertForMaskedLM(module.model.config)
    model.load_state_dict(module.model.state_dict())
    return model


class Snapshots(TrainerCallback):
    """Saves the model's weights every `every_s` seconds of training and at its end, and stops
    training once `budget_s` have passed (folder=None: only times the steps)."""

    def __init__(self, folder: Path | None, budget_s: float, every_s: float):
        self.folder, self.budget_s, self.every_s = folder, budget_s, every_s
        self.saved, self.step_ends = [], []
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)

    def on_train_begin(self, training_args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, training_args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        self.step_ends.append(seconds)
        control.should_training_stop |= seconds >= self.budget_s
        last = control.should_training_stop or state.global_step >= state.max_steps
        if self.folder and (last or seconds >= self.every_s * (len(self.saved) + 1)):
            path = self.folder / f"step{state.global_step}.pt"
            torch.save(model.state_dict(), path)
            self.saved.append({"seconds": seconds, "step": state.global_step, "path": str(path)})


def hf_trainer(args, lr: float, max_steps: int, model, callback, module, datamodule) -> Trainer:
    """The Hugging Face recipe at `lr` (run_mlm.py's other defaults: no warm-up, linear decay
    over max_steps, AdamW with betas 0.9/0.999, no weight decay), in the precision this
    project trains in here."""
    from bert_mlm.launch import precision

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    mixed = precision("mixed", accelerator)
    training_args = TrainingArguments(
        output_dir=str(Path(args.cache_dir) / "hf"), per_device_train_batch_size=args.batch, max_steps=max_steps,
        learning_rate=lr, bf16=mixed == "bf16-mixed", fp16=mixed == "16-mixed", use_cpu=accelerator == "cpu",
        save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(module.tokenizer, mlm_probability=0.15)
    return Trainer(model=model, args=training_args, train_dataset=datamodule.train_set, data_collator=collator,
                   callbacks=[callback])


def hf_steps_in_budget(args, module, datamodule) -> int:
    """The steps the Hugging Face recipe makes in the budget, timed on 3 after 2 warm-up
    steps, so that its linear decay ends with the budget as it would for a user who knew."""
    probe = Snapshots(None, math.inf, math.inf)
    hf_trainer(args, 5e-5, 5, initial_model(module), probe, module, datamodule).train()
    seconds_per_step = (probe.step_ends[-1] - probe.step_ends[1]) / (len(probe.step_ends) - 2)
    return max(1, int(args.budget / seconds_per_step))


def run_hf(args, lr: float, max_steps: int, module, datamodule) -> dict:
    start = time.perf_counter()
    snapshots = Snapshots(Path(args.cache_dir) / f"hf-{lr}", args.budget, args.budget / args.saves)
    hf_trainer(args, lr, max_steps, initial_model(module), snapshots, module, datamodule).train()
    return {"snapshots": snapshots.saved, "command_s": time.perf_counter() - start, "lr": lr, "max_steps": max_steps}


def score(runs: dict[str, dict], module, datamodule) -> float:
    """Scores every saved model with one evaluator (the held-out blocks, their fixed masks,
    HF's forward in fp32) and returns the initial model's loss."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = initial_model(module)
    initial = val_loss(model, datamodule, device, batches=10**9)
    for run in runs.values():
        for snap in run["snapshots"]:
            state = torch.load(snap["path"], map_location="cpu", weights_only=True)
            if snap["path"].endswith(".ckpt"):  # a Lightning checkpoint of this project's MLMModule
                state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
            model.load_state_dict(state)
            snap["loss"] = val_loss(model, datamodule, device, batches=10**9)
    return initial


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """When a loss curve (straight between its scored (seconds, loss) points) first gets to
    `target`; None if it never does."""
    if points and points[0][1] <= target:
        return points[0][0]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def report(args, runs: dict[str, dict], initial: float) -> str:
    lines = [f"held-out MLM loss against training time: {args.model}, batch {args.batch} x {args.seq} tokens, "
             f"a budget of {args.budget:g} s per recipe; train {args.train} ({args.train.stat().st_size / 1e3:,.0f} kB), "
             f"held out {args.heldout} ({args.heldout.stat().st_size / 1e3:,.0f} kB); the initial model: {initial:.3f}",
             "| recipe | lr | seconds | step | held-out loss |", "| --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        for snap in run["snapshots"]:
            lines.append(f"| {name} | {run['lr']:g} | {snap['seconds']:.0f} | {snap['step']} | {snap['loss']:.3f} |")
    for name, run in runs.items():
        what = (f"max_steps {run['max_steps']}, the steps timed to fit the budget" if "max_steps" in run
                else "the whole command: loading, validations before and after, export")
        lines.append(f"{name}: {run['command_s']:.0f} s in all ({what})")
    hf = [(snap["loss"], snap["seconds"], name) for name, run in runs.items() if name != "ours" for snap in run["snapshots"]]
    if hf:
        target, hf_s, hf_name = min(hf)
        points = [(0.0, initial)] + [(s["seconds"], s["loss"]) for s in runs["ours"]["snapshots"]]
        reached = time_to_reach(points, target)
        best = f"the best Hugging Face loss, {target:.3f} ({hf_name} at {hf_s:.0f} s)"
        lines.append(f"this project reaches {best} after {reached:.0f} s: {reached / hf_s:.2f}x that time"
                     if reached is not None else
                     f"this project does not reach {best} within its {args.budget:g} s "
                     f"(its best: {min(p[1] for p in points):.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=None, help="training text, one example per line (default: text on hand)")
    parser.add_argument("--heldout", type=Path, default=None, help="held-out text (default: text on hand)")
    parser.add_argument("--corpus", choices=["wikitext", "pydocs"], default="wikitext" if WIKITEXT.exists() else "pydocs",
                        help="the text on hand to split, without --train (default: WikiText-2 when here)")
    parser.add_argument("--budget", type=float, default=240, help="seconds of training per recipe")
    parser.add_argument("--saves", type=int, default=6, help="models saved along each run (and one at its end)")
    parser.add_argument("--model", default="minilm", help="a conf/model option (minilm: continued pretraining)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hf-lrs", default=HF_LRS, help="the Hugging Face runs' learning rates ('' for none)")
    parser.add_argument("--ours", default="", help="extra overrides for this project's run, e.g. 'model.lr=1e-3'")
    parser.add_argument("--common", default="", help="extra overrides for every recipe's data and model")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", default=str(ROOT / ".bench" / "quality"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if (args.train is None) != (args.heldout is None):
        sys.exit("error: give both --train and --heldout, or neither (then text on hand is used)")
    if args.train is None:
        args.train, args.heldout = default_texts(Path(args.cache_dir) / "text", args.corpus)
    args.train, args.heldout = args.train.resolve(), args.heldout.resolve()  # the runs start elsewhere

    runs = {}
    print(f"ours: python -m train for {args.budget:g} s ...", flush=True)
    runs["ours"] = run_ours(args)  # first, in a process of its own, as users run it
    module, datamodule = build(args)
    hf_lrs = [lr for lr in args.hf_lrs.split(",") if lr]
    max_steps = hf_steps_in_budget(args, module, datamodule) if hf_lrs else 0
    for lr in hf_lrs:
        print(f"hf-lr{lr}: the Hugging Face recipe for {args.budget:g} s ({max_steps} steps timed to fit) ...", flush=True)
        runs[f"hf-lr{lr}"] = run_hf(args, float(lr), max_steps, module, datamodule)
    print("scoring every saved model on the held-out text ...", flush=True)
    initial = score(runs, module, datamodule)
    print(report(args, runs, initial))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                              "initial_loss": initial, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
