"""Sweep jobs side by side on one machine (`hydra/launcher=parallel`, Hydra's joblib
launcher): each job on a GPU of its own, or on its share of the CPU cores."""

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bert_mlm import sweep_stop
from bert_mlm.errors import UserError, refuse
from bert_mlm.workers import available_cores

log = logging.getLogger(__name__)
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"

# hydra.launcher.n_jobs's default in conf/hydra/launcher/parallel.yaml: one job per GPU.
OmegaConf.register_new_resolver("bert_mlm.gpus_or_one", lambda: max(1, torch.cuda.device_count()), replace=True)


def jobs_at_once(config: DictConfig) -> int:
    """How many jobs the launcher runs at once: joblib's n_jobs (-1: one per core, -2: all
    but one, ...); 1 under any other launcher."""
    launcher = config.hydra.launcher
    if launcher.get("_target_") != JOBLIB:
        return 1
    n = launcher.n_jobs
    return n if n > 0 else max(1, available_cores() + 1 + n)


def claim_slot(lock_dir: Path, slots: int) -> tuple[int, IO]:
    """The first of `slots` slots that no live process holds, and the open lock file that
    holds it (flock: the lock goes with the process, however it ends)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        lock = (lock_dir / f"{slot}.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return slot, lock
        except BlockingIOError:
            lock.close()
    raise UserError(f"all {slots} GPU slots in {lock_dir} are taken: is another sweep running into this folder?")


def device_for(slot: int, visible: str | None) -> str:
    """The GPU of `slot`: the slot-th of CUDA_VISIBLE_DEVICES where it was set (indices or
    UUIDs), else GPU number `slot`."""
    return [d.strip() for d in visible.split(",")][slot] if visible else str(slot)


def cores_for(slot: int, slots: int, cores: list[int]) -> list[int]:
    """The slot-th of `slots` equal shares of `cores`, at least one core each."""
    share = max(1, len(cores) // slots)
    return cores[slot * share:(slot + 1) * share] or cores[-share:]


class SideBySide(Callback):
    """A Hydra callback (conf/hydra/default.yaml); does nothing unless jobs run at once.
    On GPUs each worker process of the launcher claims a GPU at its first job and keeps it
    for its life: CUDA reads CUDA_VISIBLE_DEVICES once per process, at its first use, and the
    launcher reuses its workers. With n_jobs no more than the GPUs, no two jobs share one.
    It also takes its share of the CPU cores, so that data.num_workers=null sizes its
    DataLoader workers for that share, not for a machine of its own.
    On the CPU joblib already sets each worker's OMP_NUM_THREADS to cores / n_jobs (unless
    set): torch starts with that many threads, so jobs do not fight over the cores."""

    _slot: tuple[int, IO] | None = None  # this process's GPU slot and its lock

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        n, gpus = jobs_at_once(config), torch.cuda.device_count()
        if n > 1 and _on_gpu(config) and n > gpus:
            refuse(UserError(f"hydra.launcher.n_jobs={n} runs {n} jobs at once, one GPU each, but {gpus} GPUs are "
                             f"visible: set hydra.launcher.n_jobs={gpus} or fewer"))
        if n > 1:  # in worker processes (with one, joblib runs the jobs in this one)
            try:
                sweep_stop.stop_jobs_together(config.hydra.sweep.dir)
            except UserError as err:
                refuse(err)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_stop.end()

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        n = jobs_at_once(config)
        if n <= 1:
            return
        job = config.hydra.job.num
        if not _on_gpu(config):
            log.info(f"job {job}: torch threads {torch.get_num_threads()}, {n} jobs at once on "
                     f"{available_cores()} cores (pid {os.getpid()})")
            return
        if SideBySide._slot is None:
            SideBySide._slot = claim_slot(Path(config.hydra.sweep.dir) / ".gpus", n)
            os.environ["CUDA_VISIBLE_DEVICES"] = device_for(SideBySide._slot[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
            if hasattr(os, "sched_setaffinity"):  # Linux; workers.available_cores reads it
                cores = cores_for(SideBySide._slot[0], n, sorted(os.sched_getaffinity(0)))
                os.sched_setaffinity(0, cores)
                torch.set_num_threads(len(cores))
        log.info(f"job {job}: GPU {os.environ['CUDA_VISIBLE_DEVICES']}, {n} jobs at once (pid {os.getpid()})")


def _on_gpu(config: DictConfig) -> bool:
    return config.trainer.accelerator in ("gpu", "cuda")
