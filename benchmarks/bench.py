"""`make bench`: this project's MLMModule, trained through the Lightning Trainer as users
run it, against the Hugging Face recipe (Trainer + DataCollatorForLanguageModeling +
BertForMaskedLM, as in transformers' run_mlm.py), on the same data, initial weights,
architecture, sequence length, batch size and number of steps. Each run is its own process
(so peak memory is its own), and the runners alternate over rounds; the table shows each
runner's best round. With --same-batches the HF runs train on our batches (the same masks in
the same order) instead of their collator's, which leaves the recipes as the only difference
between the losses.

    python benchmarks/bench.py [--size minilm|base|tiny] [--steps 20] [--rounds 2] ...
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SIZES = {  # layers, hidden, heads, intermediate
    "tiny": (2, 128, 2, 512),
    "minilm": (6, 384, 12, 1536),
    "base": (12, 768, 12, 3072),
}
LR, WARMUP_LR_STEPS = 5e-4, 5


def config_overrides(args) -> list[str]:
    layers, hidden, heads, inter = SIZES[args.size]
    text = Path(args.text) if args.text else WIKITEXT if WIKITEXT.exists() else None
    data = ["data=text", f"data.train_files=[{text}]"] if text else ["data=pydocs"]
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return [
        "model=tiny", f"model.num_layers={layers}", f"model.hidden_size={hidden}",
        f"model.num_heads={heads}", f"model.intermediate_size={inter}", f"model.lr={LR}",
        f"model.warmup_steps={WARMUP_LR_STEPS}", *data, f"data.max_length={args.seq}",
        f"data.batch_size={args.batch}", f"trainer.accelerator={accelerator}",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.val_check_interval=1000000",
        "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=none", "~callbacks.checkpoint",
        f"callbacks.throughput.warmup_batches={args.warmup}", f"seed={args.seed}",
        f"data.cache_dir={args.cache_dir}", f"output_dir={args.cache_dir}",
    ]


def compose(args, extra: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*config_overrides(args), *extra])


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# What HF's forward takes of our collator's batches (it adds what our module reads besides).
HF_INPUTS = ("input_ids", "attention_mask", "labels")


def val_loss(model, datamodule, device: str, batches: int = 10) -> float:
    """Loss over masked tokens of the first validation batches (the same fixed masks for
    every runner), from HF's own forward in fp32: one yardstick for both recipes."""
    model.eval().to(device)
    total = count = 0.0
    with torch.no_grad():
        for _, batch in zip(range(batches), datamodule.val_dataloader()):
            batch = {k: batch[k].to(device) for k in HF_INPUTS}
            n = (batch["labels"] != -100).sum().item()
            total += model(**batch).loss.item() * n
            count += n
    return total / count


def run_ours(args) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from train import build

    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    cfg = compose(args, args.ours.split())
    profile = Profile(args.warmup, args.device) if args.profile else None
    module, datamodule, trainer = build(cfg, callbacks=[Losses(), *[profile] * bool(profile)])
    trainer.fit(module, datamodule)
    tps = next(c for c in trainer.callbacks if type(c).__name__ == "Throughput").tokens_per_sec
    return {"tokens_per_sec": tps, "losses": [float(x) for x in losses],
            "val_loss": val_loss(module.model, datamodule, args.device),
            "precision": trainer.precision, "config": module.model.config.to_dict(),
            **({"profile": profile.summary(args.steps)} if profile else {})}


# Host-side calls that wait for the device: .item() and friends, nonzero (boolean indexing),
# device-to-host copies, explicit synchronisation.
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")


class Profile(L.Callback):
    """torch.profiler over the timed steps: where the device time goes, how busy the GPU
    is, and how often the host waits for it (each wait stops the host queueing work ahead)."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device = warmup, device
        self.between_s, self.batch_end = 0.0, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batch_end = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        # The host's time from one step's end to the next one's start: the next batch and its
        # copy, Lightning's loop. Where it is long and the GPU idle, the data does not keep up.
        if batch_idx > self.warmup:
            self.between_s += time.perf_counter() - self.batch_end
        if batch_idx == self.warmup:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.wall_us = (time.perf_counter() - self.start) * 1e6
        self.profiler.__exit__(None, None, None)

    def summary(self, steps: int) -> dict:
        events = [e for e in self.profiler.key_averages() if not getattr(e, "is_user_annotation", False)]
        cuda = self.device == "cuda"
        # Each kernel counts twice otherwise: as itself (device events) and in the op that
        # launched it (host events). Ranges such as Lightning's "Optimizer.step" span whole steps.
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        own = "self_device_time_total" if cuda else "self_cpu_time_total"
        top = sorted(ops, key=lambda e: getattr(e, own), reverse=True)[:12]
        return {
            "device_busy": sum(e.self_device_time_total for e in kernels) / self.wall_us if cuda else None,
            "ms_per_step": self.wall_us / 1e3 / steps,
            "ms_between_steps": self.between_s * 1e3 / max(steps - 1, 1),
            # On a GPU only the calls that wait for it: an op on a host tensor launches no kernel.
            "syncs_per_step": {key: n / steps for key, n in Counter(
                e.key for e in self.profiler.events() if e.key in SYNCS
                and (not cuda or e.key.startswith("cuda") or e.device_time_total > 0)).items()},
            "top": [(e.key, getattr(e, own) / 1e3 / steps) for e in top],  # ms per step
        }


def run_hf(args, bf16: bool) -> dict:
    from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling,
                              Trainer, TrainerCallback, TrainingArguments)

    sys.path.insert(0, str(ROOT / "src"))
    from train import build

    # The same token blocks ours trains on, from our data module.
    cfg = compose(args, [])
    module, datamodule, _ = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = module.tokenizer
    layers, hidden, heads, inter = SIZES[args.size]
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, pad_token_id=tokenizer.pad_token_id))
    model.load_state_dict(module.model.state_dict())  # the initial weights ours starts from
    del module

    times, losses = [], []

    class Record(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    training_args = TrainingArguments(
        output_dir=str(Path(args.cache_dir) / "hf"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LR, warmup_steps=WARMUP_LR_STEPS,
        weight_decay=0.01, adam_beta2=0.98, adam_epsilon=1e-6, max_grad_norm=1.0,
        lr_scheduler_type="linear", bf16=bf16, use_cpu=args.device == "cpu", logging_steps=1,
        save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    class OurBatches(Trainer):
        def get_train_dataloader(self):  # our masks and order, with our DataLoader worker
            return datamodule.train_dataloader()

        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, {k: inputs[k] for k in HF_INPUTS}, *args, **kwargs)

    trainer = (OurBatches if args.same_batches else Trainer)(
        model=model, args=training_args, train_dataset=datamodule.train_set, data_collator=collator,
        callbacks=[Record()])
    trainer.train()
    tokens = args.steps * args.batch * args.seq  # packed blocks: no padding
    return {"tokens_per_sec": tokens / (times[-1] - times[args.warmup - 1]), "losses": losses,
            "val_loss": val_loss(model, datamodule, args.device),
            "precision": "bf16-mixed" if bf16 else "32-true", "config": model.config.to_dict()}


def run_worker(command: list[str], name: str, env: dict[str, str] | None = None) -> dict:
    """Runs a worker process and returns what it printed on its `RESULT {json}` line."""
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"error: the {name} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def worker(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from bert_mlm.flops import measure_peak_flops, peak_flops

    result = run_ours(args) if args.worker == "ours" else run_hf(args, bf16=args.worker == "hf-bf16")
    result["peak_memory_gb"] = peak_memory_gb(args.device)
    # MFU's yardstick: on a CPU a large matrix product in the run's precision, measured right
    # after the run in the same process (a shared machine's speed drifts over minutes).
    dtype = torch.bfloat16 if "bf16" in str(result["precision"]) else torch.float32
    result["peak_flops"] = (measure_peak_flops("cpu", dtype) if args.device == "cpu"
                            else peak_flops(torch.device(args.device)))
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="timed steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runners", default=None,
                        help="default: ours,hf-bf16,hf-fp32; hf-bf16 left out on CPUs without native bf16")
    parser.add_argument("--ours", default="", help="extra overrides for ours, e.g. 'model.dropout=0.1'")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--same-batches", action="store_true",
                        help="HF trains on our batches (masks, order) instead of its collator's: for loss comparisons")
    parser.add_argument("--text", default=None, help="a text file to train on (default: WikiText-2 valid when here, else pydocs)")
    parser.add_argument("--profile", action="store_true",
                        help="profile ours over the timed steps (torch.profiler): slower, so not for speed figures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT / "src"))
    from bert_mlm.flops import flops_per_token
    from bert_mlm.launch import NO_BF16_ENV, cpu_has_native_bf16
    from transformers import BertConfig

    bf16 = args.device == "cuda" or cpu_has_native_bf16()
    if not bf16:
        print(f"bf16 is not native on this CPU (or {NO_BF16_ENV}=1 says so): emulated, it runs many times "
              "slower than fp32, so bf16 runs and the bf16 peak are left out")
    args.runners = args.runners or ("ours,hf-bf16,hf-fp32" if bf16 else "ours,hf-fp32")
    runners = args.runners.split(",")
    results: dict[str, list[dict]] = {r: [] for r in runners}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("out", "worker", "same_batches", "profile") and v is not None]
    passthrough += ["--same-batches"] * args.same_batches + ["--profile"] * args.profile
    for round_ in range(args.rounds):
        for runner in runners:
            print(f"round {round_ + 1}/{args.rounds}: {runner} ...", flush=True)
            results[runner].append(run_worker([sys.executable, __file__, *passthrough, "--worker", runner], runner))

    best = {r: max(rs, key=lambda x: x["tokens_per_sec"]) for r, rs in results.items()}
    config = BertConfig(**next(iter(best.values()))["config"])
    fpt = flops_per_token(config, args.seq, 0.15)
    # The Hugging Face recipe at its fastest precision here (bf16 where native, else fp32).
    hf = [r for r in best if r.startswith("hf")]
    base = best[max(hf, key=lambda r: best[r]["tokens_per_sec"])] if hf else next(iter(best.values()))
    print(f"\n{args.size} architecture ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}), seq {args.seq}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}, best of {args.rounds} rounds, on {args.device}; "
          f"data: {args.text or ('wikitext-2 valid' if WIKITEXT.exists() else 'pydocs')}; the same initial weights, "
          f"{'the same batches' if args.same_batches else 'HF masks with its own collator'}")
    print(f"model FLOPs per token (fwd+bwd, MLM head on 15% of tokens): {fpt / 1e6:.1f} M; tokens/s of each round: "
          + "; ".join(f"{r} " + ", ".join(f"{x['tokens_per_sec']:,.0f}" for x in rs) for r, rs in results.items()))
    header = f"| {'runner':10} | {'precision':10} | {'tokens/s':>9} | {'x HF best':>9} | {'peak mem GB':>11} | {'val loss':>8} | {'TFLOP/s':>8} | {'peak':>8} | {'MFU':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for runner, r in best.items():
        achieved = fpt * r["tokens_per_sec"]
        p = r["peak_flops"]
        mfu, peak = (f"{achieved / p:6.1%}", f"{p / 1e12:8.3f}") if p else ("   n/a", "     n/a")
        print(f"| {runner:10} | {r['precision']:10} | {r['tokens_per_sec']:9,.0f} | "
              f"{r['tokens_per_sec'] / base['tokens_per_sec']:9.2f} | {r['peak_memory_gb']:11.2f} | "
              f"{r['val_loss']:8.3f} | {achieved / 1e12:8.3f} | {peak} | {mfu} |")
    print("(TFLOP/s: useful model FLOPs per second; peak: a 2048^3 matrix product in the run's precision, "
          "measured in the same process right after the run; MFU = TFLOP/s / peak)")
    for runner, r in best.items():
        if "profile" in r:
            p = r["profile"]
            busy = f", device busy {p['device_busy']:.0%} of the wall time" if p["device_busy"] is not None else ""
            print(f"\nprofile of {runner} (slowed by the profiler): {p['ms_per_step']:.1f} ms per step{busy}, "
                  f"{p['ms_between_steps']:.1f} ms of it on the host between steps (the next batch, Lightning); "
                  "host waits per step (calls): " + (", ".join(f"{k} {v:g}" for k, v in p["syncs_per_step"].items()) or "none"))
            print("time per step by op (ms): " + "; ".join(f"{k} {v:.2f}" for k, v in p["top"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "flops_per_token": fpt}, indent=2))


if __name__ == "__main__":
    main()
