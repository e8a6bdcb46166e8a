"""What libraries print on every run that a user can do nothing about: deprecation notices
from inside torchdata and Lightning (on torch 2.13), Lightning's advertisement, and its note
that our summary callback replaces its own."""

import logging
import warnings

NOTICES = ("'set_vital' is deprecated", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
LOG_LINES = ("💡 Tip:", "Trainer already configured with model summary")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LOG_LINES)


def silence_library_noise() -> None:
    for message in NOTICES:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLines())
