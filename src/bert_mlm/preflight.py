"""Checks that run before Hydra writes anything into the run folder (its .hydra/ config
record included): the settings are valid, and the folder does not already hold a run that
this one would overwrite."""

import os
from contextlib import suppress
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bert_mlm.checks import check_config
from bert_mlm.errors import UserError, refuse
from bert_mlm.launch import check, launched_rank
from bert_mlm.resume import resolve
from bert_mlm.run_folder import (NEW_RECORD, RECORD, claim, hold, new_folder, output_dir_given, put_back, release,
                                 resumes)


def _timestamped(node: DictConfig) -> bool:
    """Whether a run or sweep folder is named by the time it starts (Hydra's ${now:...}, as in
    conf/hydra/default.yaml), not given: a folder given by name may be a run to resume."""
    return "${now:" in str(OmegaConf.to_container(node, resolve=False).get("dir"))


def _remove_if_empty(folder: Path) -> None:
    """A folder made here, outputs/DATE/TIME, with nothing in it (and its day's, if no other run is in it)."""
    with suppress(OSError):
        folder.rmdir()
        folder.parent.rmdir()


class Preflight(Callback):
    _made: Path | None = None  # the run folder Hydra named by the time (outputs/DATE/TIME), made here

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # The run folder: Hydra's, unless output_dir was given in its place.
        given = output_dir_given(config)
        folder = Path(config.output_dir if given else OmegaConf.select(config, "hydra.run.dir"))
        # Named by the command line: then all processes of a DDP run (torchrun, srun) take the same one.
        named = given or any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        made = not given and _timestamped(config.hydra.run)  # Hydra's own, outputs/DATE/TIME
        if made:
            folder = self._made = new_folder(folder)
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(folder)  # Hydra's own files (.hydra/, train.log) go there too
        if config.prepare_only:  # it trains nothing: no .hydra/ record, over that of a run in the folder
            with read_write(config.hydra):
                config.hydra.output_subdir = None
        cfg = config.copy()
        with open_dict(cfg):
            cfg.output_dir = str(folder)  # ${hydra:runtime.output_dir} is only set later
        try:
            if config.hydra.job.chdir:
                raise UserError("hydra.job.chdir=true is not supported: paths are read from the folder the command "
                                "runs in, and the run folder is hydra.run.dir")
            # Held before anything in it is touched; by one process of a DDP run (the one Lightning's
            # launcher or torchrun or srun started first), not by prepare_only, which writes nothing there.
            holder = launched_rank() == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
            if holder and not config.prepare_only and folder.is_dir():
                hold(folder)
            if not config.overwrite:  # an overwrite=true killed while it checked its data: the run is still there
                put_back(folder)
            check_config(cfg)
            check(config.trainer.get("strategy"), multirun=False, run_dir_given=named)
            # Every process of a DDP run checks the folder, so that all of them stop on a
            # refusal (one left waiting for the others would hang until the process group's
            # time-out). prepare_only writes nothing there but a vocabulary, which checks itself.
            if not config.prepare_only:
                # A checkpoint that is not there is refused here.
                claim(folder, resumes(resolve(config.ckpt_path, folder), folder), config.overwrite)
            if config.hydra.output_subdir == RECORD and not made and folder.is_dir() and any(folder.iterdir()):
                # A run may still be refused after Hydra writes its record: in a folder that holds
                # something (a run, a vocabulary), it goes beside, until the run is accepted (accept_record).
                with read_write(config.hydra):
                    config.hydra.output_subdir = NEW_RECORD
            if holder and not config.prepare_only:
                hold(folder)  # made here, if it was not there
        except UserError as err:
            release()
            if made:
                _remove_if_empty(folder)
            refuse(err)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if config.prepare_only and self._made:  # it wrote into the cache, not there (but a vocabulary, a log)
            _remove_if_empty(self._made)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        made = _timestamped(config.hydra.sweep)
        if made:  # Hydra's own, multirun/DATE/TIME: each sweep its own, as for runs
            sweep = new_folder(sweep)
            with read_write(config.hydra):
                config.hydra.sweep.dir = str(sweep)
                # Each job's config is composed again from these overrides (Hydra's load_sweep_config).
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={sweep}")
        try:  # each job's settings are checked when it builds: a job that fails them fails alone
            if sweep.exists() and not sweep.is_dir():
                raise UserError(f"the sweep folder {sweep} is a file: give a folder (hydra.sweep.dir=...)")
            check(OmegaConf.select(config, "trainer.strategy"), multirun=True, run_dir_given=True)
            if output_dir_given(config):  # and not swept (output_dir=a,b)
                raise UserError(f"output_dir={config.output_dir} would be the run folder of every job of the "
                                "sweep: leave it out (job N goes to hydra.sweep.dir/N)")
            if "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_")) and \
                    OmegaConf.select(config, "trainer.limit_val_batches") == 0:
                raise UserError("hparams_search=optuna minimises the final val/loss: validation cannot be off "
                                "(trainer.limit_val_batches=0)")
            for job in sorted(p for p in sweep.glob("*") if p.is_dir()):
                claim(job, resumes(config.ckpt_path, job), config.overwrite, where="hydra.sweep.dir")
            if (config.ckpt_path or config.overwrite) and config.hydra.output_subdir == RECORD:
                # Jobs that may still be refused after Hydra writes their records, as a single run
                # may (on_run_start): each job's config is composed again from these overrides.
                with read_write(config.hydra):
                    config.hydra.output_subdir = NEW_RECORD
                    config.hydra.overrides.hydra.append(f"hydra.output_subdir={NEW_RECORD}")
        except UserError as err:
            if made:
                with suppress(OSError):
                    sweep.rmdir()
            refuse(err)
