"""Stop signals. Ctrl-C behaves like SIGTERM: Lightning finishes the batch, last.ckpt is
saved and the run says how to resume; a second Ctrl-C ends the process at once. Outside a
Trainer (preparing data, exporting), where Lightning has no handler, both stop at once with
the same message. Under DDP every rank stops at the end of the same step (StopTogether)."""

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only


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
        if rank_zero_only.rank == 0:  # a terminal's Ctrl-C reaches every process of a DDP run
            print("\nCtrl-C: stopping after this batch and saving checkpoints/last.ckpt "
                  "(Ctrl-C again stops at once, unsaved)", file=sys.stderr)
        handler(signal.SIGTERM, frame)  # Lightning's: it stops at the end of the batch

    previous = signal.signal(signal.SIGINT, on_ctrl_c), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


class StopTogether(L.Callback):
    """Under DDP, a stop signal (SIGTERM, or Ctrl-C through it) that reaches any rank stops
    every rank at the end of the same optimizer step, where last.ckpt is then saved by all.
    Lightning's own handler broadcasts from inside the signal handler and stops each rank at
    the end of its own batch: ranks signalled more than once (a terminal's Ctrl-C or scancel
    reaches every process, and Lightning's launcher passes a signal on) or at other points
    wait for each other forever. With one process, Lightning's handler does it."""

    def __init__(self):
        self._noted = False
        self._step = -1

    def _take_over(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1:  # Lightning's handler, installed for this call, is put back at its end
            self._noted = False
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self._noted = True

    def on_train_start(self, trainer, pl_module):
        self._take_over(trainer)

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":  # trainer.validate (in fit: taken over already)
            self._take_over(trainer)

    def requested(self, trainer: L.Trainer) -> bool:
        """Whether a stop signal reached this process, or under DDP any process (a collective:
        every rank asks at the same point)."""
        if trainer.world_size == 1:
            return trainer.received_sigterm
        return trainer.strategy.reduce_boolean_decision(self._noted, all=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.world_size == 1 or trainer.global_step == self._step:  # or mid gradient accumulation
            return
        self._step = trainer.global_step
        if self.requested(trainer):
            raise SIGTERMException
