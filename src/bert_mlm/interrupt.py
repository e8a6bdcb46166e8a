"""Ctrl-C behaves like SIGTERM: Lightning finishes the batch, last.ckpt is saved and the
run says how to resume. A second Ctrl-C ends the process at once."""

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace


@contextmanager
def ctrl_c_as_sigterm() -> Iterator[SimpleNamespace]:
    """Yields a namespace whose `pressed` says whether Ctrl-C was pressed."""
    state = SimpleNamespace(pressed=False)

    def on_ctrl_c(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C: the default, at once
        state.pressed = True
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(on_sigterm):  # no Trainer running (preparing data, exporting): just stop
            raise KeyboardInterrupt
        print("\nCtrl-C: stopping after this batch and saving checkpoints/last.ckpt "
              "(Ctrl-C again stops at once, unsaved)", file=sys.stderr)
        on_sigterm(signal.SIGTERM, frame)  # Lightning's: it stops at the end of the batch

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
