"""SLURM's warning before the time limit (`#SBATCH --signal=SIGUSR1@120`): every rank stops
at the same batch end, checkpoints/last.ckpt is saved, global rank 0 requeues the job with
`scontrol requeue`, and the requeued job (the same command) resumes from that last.ckpt.

Lightning's own SIGUSR1 handler (SLURMEnvironment(auto_requeue=True)) saves
hpc_ckpt_N.ckpt from inside the signal handler, wherever the step is, lets training go on
until SLURM kills the job, and on restart loads that older file, and only with no
ckpt_path. Lightning installs it only where SIGUSR1 has no handler yet: ours comes first."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities.exceptions import SIGTERMException

from bert_mlm.checkpoints import last_checkpoint
from bert_mlm.launch import started_by_srun

if TYPE_CHECKING:
    from bert_mlm.interrupt import StopTogether

SIGNAL = signal.SIGUSR1


def slurm_job_id() -> str | None:
    """The job `scontrol requeue` takes: an array task as ARRAYID_TASKID; None outside a
    SLURM job started by srun (an interactive one cannot be requeued)."""
    if not started_by_srun() or "SLURM_JOB_ID" not in os.environ:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


def requeued_checkpoint(output_dir: Path) -> Path | None:
    """The run folder's last.ckpt when this is a requeued SLURM job (SLURM counts restarts in
    SLURM_RESTART_COUNT) and its earlier attempt saved one: the newest state of this run,
    newer than any ckpt_path the job was first started from."""
    last = last_checkpoint(output_dir)
    return last if int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0 and last.is_file() else None


class Requeue(SIGTERMException):
    """Raised on every rank at the same batch end once SLURM warned. A SIGTERMException, so
    checkpoints.LastCheckpoint saves last.ckpt on it as on SIGTERM."""

    def __init__(self, job_id: str, global_zero: bool):
        super().__init__()
        self.job_id, self.global_zero = job_id, global_zero

    def requeue(self) -> None:
        """`scontrol requeue JOB` from global rank 0, after last.ckpt is saved: SLURM ends
        the job at once and starts it again later."""
        if not self.global_zero:
            return
        done = subprocess.run(["scontrol", "requeue", self.job_id]).returncode == 0
        print(f"requeued SLURM job {self.job_id}: it resumes from checkpoints/last.ckpt" if done else
              f"scontrol requeue {self.job_id} failed: resume by hand as above", file=sys.stderr)


class SlurmWarning:
    """Notes SLURM's signal. interrupt.StopTogether stops training at the end of the first
    optimizer step by which any rank has noted it, on every rank: acting inside the handler
    would save half a step, and ranks that get the signal in different steps would each stop
    at another. Asked every step, though under DDP that is a collective that waits for the
    device: the warning comes a set time ahead (--signal=SIGUSR1@120), which log_every_n_steps
    of slow steps could outlast. The same collective asks for the other stop signals."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.warned = False

    def on_signal(self, signum: int, frame) -> None:
        self.warned = True


@contextmanager
def stop_on_slurm_warning(stops: "StopTogether") -> Iterator[None]:
    """Under srun, gives `stops` SLURM's warning, handling SIGUSR1 for the whole run (also
    outside training, where SIGUSR1 would otherwise end the process); elsewhere nothing."""
    job_id = slurm_job_id()
    if job_id is None:
        yield
        return
    stops.warning = SlurmWarning(job_id)
    previous = signal.signal(SIGNAL, stops.warning.on_signal)
    try:
        yield
    finally:
        signal.signal(SIGNAL, previous)
