"""Save a checkpoint when the job is told to stop (SIGTERM: what SLURM and Kubernetes send
before they kill it). Lightning notices the signal, finishes the current batch and raises
SIGTERMException on every rank; this callback saves last.ckpt then, and `python -m train`
exits with a message that says how to resume."""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnSigterm(L.Callback):
    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException):
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)  # on every rank: it synchronizes them
