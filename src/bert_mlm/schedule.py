"""The learning-rate schedule: linear warm-up over `warmup_steps`, then a decay to 0 at the
end of training (linear, cosine, or the peak until a linear cool-down over the last
`cooldown` share, 20% by default), whether that end is a number of steps
(trainer.max_steps or max_epochs) or a time budget (trainer.max_time), whichever comes first.

With a budget the decay follows the elapsed share of it, as Cramming's budget schedules
do, so a run told "one hour" anneals to 0 in an hour whatever its speed. The elapsed time
is read from Lightning's Timer (the callback trainer.max_time adds), whose state is saved
in checkpoints: a resumed run goes on from the saved share instead of starting again."""

import math
from collections.abc import Callable
from typing import Literal

from lightning.pytorch.callbacks import Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# What a run without max_steps, max_epochs or max_time is told (checked with the config, and by MLMModule).
NO_END = "training has no end: set trainer.max_steps, trainer.max_epochs or trainer.max_time"


Decay = Literal["linear", "cosine", "wsd"]
COOLDOWN = 0.2  # wsd's default share of the decay in which the lr falls to 0 (the one measured)

# The decay's shape as a function of the share of it still to go (1 -> 0) and wsd's cool-down share.
DECAYS: dict[str, Callable[[float, float], float]] = {
    "linear": lambda left, cooldown: left,
    "cosine": lambda left, cooldown: 0.5 * (1.0 - math.cos(math.pi * left)),
    # warm-up, stable, decay (Hägele et al. 2024): the peak until the last `cooldown`, then linear to 0
    "wsd": lambda left, cooldown: min(1.0, left / cooldown),
}


def lr_factor(step: int, warmup_steps: int, total_steps: float, time_share: float = 0.0,
              decay: Decay = "linear", cooldown: float = COOLDOWN) -> float:
    """The share of the peak learning rate for `step`. `total_steps`: inf when only the
    budget ends training; `time_share`: the elapsed share of the budget (0 without one);
    `cooldown`: wsd's share of the decay (after warm-up) in which it falls to 0.

    Linear without a budget is transformers' get_linear_schedule_with_warmup, float for
    float, so runs and checkpoints from before the budget existed are unchanged."""
    warm = float(step) / float(max(1, warmup_steps)) if step < warmup_steps else 1.0
    if step < warmup_steps or math.isinf(total_steps):
        left = 1.0
    else:
        left = float(total_steps - step) / float(max(1, total_steps - warmup_steps))
    left = max(0.0, min(left, 1.0 - time_share))  # whichever end comes first
    return min(warm, DECAYS[decay](left, cooldown))


def budget_timer(callbacks: list) -> Timer | None:
    """The Timer that trainer.max_time adds (or one given by hand), when it has a duration."""
    return next((c for c in callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)


def lr_schedule(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: float,
    timer: Timer | None = None,
    broadcast: Callable[[float], float] = lambda x: x,
    decay: Decay = "linear",
    cooldown: float = COOLDOWN,
    share_every: int = 1,
) -> LambdaLR:
    """A LambdaLR for `lr_factor`; with `timer`, the time share is its elapsed training time
    over its duration. `broadcast` hands every rank rank 0's elapsed time: each rank steps
    its own optimizer, and learning rates that differ by a clock's jitter would let the
    replicas' weights drift apart. A broadcast makes the host wait for the device, so it
    runs every `share_every` steps (at the same steps on every rank), and the steps in
    between keep the share last read: a few steps' lag in a decay over a time budget."""
    # Read before training starts, while both are constant (elapsed: the restored time, or 0).
    budget_s = timer.time_elapsed() + timer.time_remaining() if timer else 0.0
    share = [None]  # the elapsed share last read

    def time_share(step: int) -> float:
        if timer is None:
            return 0.0
        if share[0] is None or step % share_every == 0:
            share[0] = broadcast(timer.time_elapsed()) / budget_s if budget_s > 0 else 1.0
        return share[0]

    def factor(step: int) -> float:  # a plain function: LambdaLR saves no state of it in checkpoints
        return lr_factor(step, warmup_steps, total_steps, time_share(step), decay, cooldown)

    return LambdaLR(optimizer, factor)
