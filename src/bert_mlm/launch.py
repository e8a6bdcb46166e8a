"""How this process was started (a Hydra sweep, torchrun, srun) and what that rules out."""

import os

from bert_mlm.errors import UserError


def launched_world_size() -> int:
    """Processes started together by torchrun or srun (1 when run directly)."""
    return max(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("SLURM_NTASKS", 1)))


def check(strategy: str | None, multirun: bool, run_dir_given: bool) -> None:
    relaunches = str(strategy).startswith("ddp") and "spawn" not in str(strategy)
    if multirun and relaunches:
        # Lightning's DDP re-runs the script for each rank, which a Hydra sweep cannot
        # survive: the ranks hang (Lightning issue 11300, revert in PR 15737).
        raise UserError(
            "trainer=ddp cannot run inside a sweep (-m): sweep with trainer=gpu (one GPU per "
            "job), or start one DDP run per command"
        )
    if launched_world_size() > 1 and not run_dir_given:
        # Every process resolves its own ${now:...} run folder; they must share one.
        raise UserError(
            "under torchrun or srun all processes need one run folder: add hydra.run.dir=<folder>, "
            "e.g. hydra.run.dir=outputs/$SLURM_JOB_ID"
        )
