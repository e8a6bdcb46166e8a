"""Stop signals. Ctrl-C behaves like SIGTERM: Lightning finishes the batch, last.ckpt is
saved and the run says how to resume; a second Ctrl-C ends the process at once. Outside a
Trainer (preparing data, exporting), where Lightning has no handler, both stop at once with
the same message. Under DDP every rank stops at the end of the same step (StopTogether)."""

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from bert_mlm.requeue import Requeue, SlurmWarning


@contextmanager
def stop_signals() -> Iterator["StopTogether"]:
    """Yields the callback that stops a Trainer's run on them; its `pressed` says whether
    Ctrl-C was pressed, its `noted` whether any stop signal came."""
    stops = StopTogether()

    def on_sigterm(signum, frame):
        # While a Trainer runs, Lightning's handler is installed and calls this one after its
        # own, which stops at the end of the batch: nothing more to do then.
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            stops.noted = True
            raise SIGTERMException

    def on_ctrl_c(signum, frame):
        stops.pressed = stops.noted = True  # noted: a library that swallows the raise cannot lose the stop
        handler = signal.getsignal(signal.SIGTERM)
        if handler is on_sigterm:  # no Trainer running: just stop (as SIGTERM: Lightning takes a
            raise SIGTERMException  # KeyboardInterrupt while it prepares the data for a failure, status 1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C: the default, at once
        if rank_zero_only.rank == 0:  # a terminal's Ctrl-C reaches every process of a DDP run
            print("\nCtrl-C: stopping after this batch and saving checkpoints/last.ckpt "
                  "(Ctrl-C again stops at once, unsaved)", file=sys.stderr)
        handler(signal.SIGTERM, frame)  # Lightning's: it stops at the end of the batch

    on_ctrl_c.stops_the_run = True  # see _leave_stopping_to_the_parent
    previous = signal.signal(signal.SIGINT, on_ctrl_c), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stops
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _leave_stopping_to_the_parent() -> None:
    """In a process forked from a run (the `datasets` tokenizing pool, DataLoader workers): a
    terminal's Ctrl-C reaches it too, and is the parent's to act on; a SIGTERM (the pool's
    end) ends it. Our handlers there raised where nothing catches, or left it running."""
    if getattr(signal.getsignal(signal.SIGINT), "stops_the_run", False):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_leave_stopping_to_the_parent)


class StopTogether(L.Callback):
    """Under DDP, a stop signal (SIGTERM, or Ctrl-C through it) that reaches any rank stops
    every rank at the end of the same optimizer step, where last.ckpt is then saved by all.
    Lightning's own handler broadcasts from inside the signal handler and stops each rank at
    the end of its own batch: ranks signalled more than once (a terminal's Ctrl-C or scancel
    reaches every process, and Lightning's launcher passes a signal on) or at other points
    wait for each other forever. With one process, Lightning's handler does it.

    Under srun, SLURM's warning before the time limit (`warning`, requeue.py) is agreed on in
    the same collective, and stops every rank as a Requeue."""

    def __init__(self):
        self.pressed = self.noted = False
        self.warning: SlurmWarning | None = None
        self._step = -1

    def _take_over(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1:  # Lightning's handler, installed for this call, is put back at its end
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.noted = True

    def on_train_start(self, trainer, pl_module):
        self._step = trainer.global_step  # (the first batches of an accumulated step end none)
        self._take_over(trainer)

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":  # trainer.validate (in fit: taken over already)
            self._take_over(trainer)

    def _agreed(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """Whether a stop signal, and whether SLURM's warning, reached this process, or under
        DDP any process: one collective for both (every rank asks at the same point), as it
        makes the host wait for the device."""
        warned = self.warning is not None and self.warning.warned
        if trainer.world_size == 1:
            return trainer.received_sigterm or self.noted, warned
        flags = torch.tensor([self.noted, warned], dtype=torch.int32, device=trainer.strategy.root_device)
        stops, warnings = trainer.strategy.reduce(flags, reduce_op="sum").tolist()  # counts of ranks
        return stops > 0, warnings > 0

    def requested(self, trainer: L.Trainer) -> bool:
        """Whether a stop signal reached this process, or under DDP any process (a collective)."""
        return self._agreed(trainer)[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:  # once a step (not mid gradient accumulation), on every rank
            self._step = trainer.global_step
            if trainer.world_size > 1 or self.warning is not None:  # else Lightning's handler stops it
                stop, warned = self._agreed(trainer)
                if warned:  # before a stop: the requeued job goes on where this one stopped
                    raise Requeue(self.warning.job_id, trainer.is_global_zero)
                if stop:
                    raise SIGTERMException
        if trainer.world_size == 1 and self.noted and not trainer.received_sigterm:
            raise SIGTERMException  # Lightning stops on its flag; a stop noted before it ran (one a library swallowed) has none
