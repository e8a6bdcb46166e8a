"""What libraries print on every run that a user can do nothing about: deprecation notices
from inside torchdata and Lightning (on torch 2.13), Lightning's advertisement, and its note
that our summary callback replaces its own, or that SLURM requeueing is set up its way."""

import logging
import warnings

NOTICES = ("'set_vital' is deprecated", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
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
