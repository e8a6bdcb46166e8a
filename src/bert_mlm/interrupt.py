"""Stop signals. Ctrl-C behaves like SIGTERM: Lightning finishes the batch, last.ckpt is
saved and the run says how to resume; a second Ctrl-C ends the process at once. Outside a
Trainer (preparing data, exporting), where Lightning has no handler, both stop at once with
the same message."""

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from lightning.pytorch.utilities.exceptions import SIGTERMException


@contextmanager
def stop_signals() -> Iterator[SimpleNamespace]:
    """Yields a namespace whose `pressed` says whether Ctrl-C was pressed."""
    state = SimpleNamespace(pressed=False)

    def on_sigterm(signum, frame):
        # While a Trainer runs, Lightning's handler is installed and calls this one after its
        # own, which stops at the end of the batch: nothing more to do then.
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            raise SIGTERMException

    def on_ctrl_c(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C: the default, at once
        state.pressed = True
        handler = signal.getsignal(signal.SIGTERM)
        if handler is on_sigterm:  # no Trainer running: just stop
            raise KeyboardInterrupt
        print("\nCtrl-C: stopping after this batch and saving checkpoints/last.ckpt "
              "(Ctrl-C again stops at once, unsaved)", file=sys.stderr)
        handler(signal.SIGTERM, frame)  # Lightning's: it stops at the end of the batch

    previous = signal.signal(signal.SIGINT, on_ctrl_c), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
