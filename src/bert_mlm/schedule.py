"""The learning-rate schedule: linear warm-up over `warmup_steps`, then linear decay to 0
at the end of training, whether that end is a number of steps (trainer.max_steps or
max_epochs) or a time budget (trainer.max_time), whichever comes first.

With a budget the decay follows the elapsed share of it, as Cramming's budget schedules
do, so a run told "one hour" anneals to 0 in an hour whatever its speed. The elapsed time
is read from Lightning's Timer (the callback trainer.max_time adds), whose state is saved
in checkpoints: a resumed run goes on from the saved share instead of starting again."""

import math
from collections.abc import Callable

from lightning.pytorch.callbacks import Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup_steps: int, total_steps: float, time_share: float = 0.0) -> float:
    """The share of the peak learning rate for `step`. `total_steps`: inf when only the
    budget ends training; `time_share`: the elapsed share of the budget (0 without one).

    Without a budget this is transformers' get_linear_schedule_with_warmup, float for
    float, so runs and checkpoints from before the budget existed are unchanged."""
    if step < warmup_steps:
        by_steps = float(step) / float(max(1, warmup_steps))
    elif math.isinf(total_steps):
        by_steps = 1.0
    else:
        by_steps = float(total_steps - step) / float(max(1, total_steps - warmup_steps))
    return max(0.0, min(by_steps, 1.0 - time_share))


def budget_timer(callbacks: list) -> Timer | None:
    """The Timer that trainer.max_time adds (or one given by hand), when it has a duration."""
    return next((c for c in callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)


def linear_schedule(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: float,
    timer: Timer | None = None,
    broadcast: Callable[[float], float] = lambda x: x,
) -> LambdaLR:
    """A LambdaLR for `lr_factor`; with `timer`, the time share is its elapsed training time
    over its duration. `broadcast` hands every rank rank 0's elapsed time: each rank steps
    its own optimizer, and learning rates that differ by a clock's jitter would let the
    replicas' weights drift apart."""
    # Read before training starts, while both are constant (elapsed: the restored time, or 0).
    budget_s = timer.time_elapsed() + timer.time_remaining() if timer else 0.0

    def time_share() -> float:
        if timer is None:
            return 0.0
        return broadcast(timer.time_elapsed()) / budget_s if budget_s > 0 else 1.0

    def factor(step: int) -> float:  # a plain function: LambdaLR saves no state of it in checkpoints
        return lr_factor(step, warmup_steps, total_steps, time_share())

    return LambdaLR(optimizer, factor)
