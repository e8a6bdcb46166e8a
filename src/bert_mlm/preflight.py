"""Checks that run before Hydra writes anything into the run folder (its .hydra/ config
record included): the settings are valid, and the folder does not already hold a run that
this one would overwrite."""

import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from bert_mlm.checks import check_config
from bert_mlm.errors import UserError

# What a run writes into its folder; `overwrite=true` removes these first.
RUN_OUTPUTS = ("checkpoints", "hf_model", "metrics.json", "tensorboard", "tokenizer")


def holds_run(folder: Path) -> bool:
    return ((folder / "metrics.json").exists() or (folder / "hf_model").exists()
            or any((folder / "checkpoints").glob("*.ckpt")))


def claim(folder: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuses a folder holding an earlier run unless the run resumes (`ckpt_path`) or
    replaces it (`overwrite`), and then clears that run's outputs."""
    if ckpt_path is not None or not holds_run(folder):
        return
    if not overwrite:
        raise UserError(f"{folder} already holds a run: resume it with ckpt_path=last, start a new run "
                        "in another folder (hydra.run.dir=...), or replace it with overwrite=true")
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _refuse(err: UserError):
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(OmegaConf.select(config, "hydra.run.dir"))
        cfg = config.copy()
        with open_dict(cfg):
            cfg.output_dir = str(folder)  # ${hydra:runtime.output_dir} is only set later
        try:
            check_config(cfg)
            # Only one process claims the folder: under torchrun or DDP the others start
            # later or at once, and must not see this run's own outputs as an earlier run's.
            if rank_zero_only.rank == 0:
                claim(folder, config.ckpt_path, config.overwrite)
        except UserError as err:
            _refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        try:  # each job's settings are checked when it builds
            for job in sorted(p for p in sweep.glob("*") if p.is_dir()):
                claim(job, config.ckpt_path, config.overwrite)
        except UserError as err:
            _refuse(err)
