"""What libraries print on every run that a user can do nothing about: deprecation notices
from inside torchdata and Lightning (on torch 2.13), Lightning's advertisement, its note
that our summary callback replaces its own, or that SLURM requeueing is set up its way, and
its warning that the summary's size in MB assumes 32 bits under mixed precision (where the
weights are indeed fp32), and two warnings that do not apply here (below)."""

import logging
import warnings

NOTICES = ("'set_vital' is deprecated", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
           r"Precision .*-mixed is not supported by the model summary",
           # The validation metrics are summed over the ranks before they are logged.
           r"It is recommended to use `self.log\('val/.*sync_dist=True",
           # A resumed run's folder; any other run into a used folder is refused (preflight).
           r"Checkpoint directory .* exists and is not empty")
# The last: under srun Lightning announces its requeue handler, which bert_mlm.requeue replaces.
LOG_LINES = ("💡 Tip:", "Trainer already configured with model summary", "SLURM auto-requeueing enabled")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LOG_LINES)


def silence_library_noise() -> None:
    for message in NOTICES:
        warnings.filterwarnings("ignore", message=message)
    for logger in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(logger).addFilter(_DropLines())
