"""The optimizer steps at which the host may wait for the device."""

import lightning as L


def logs_at(step: int, trainer: L.Trainer) -> bool:
    """Whether Lightning writes the values logged in the optimizer step that brings the count
    to `step` (every trainer.log_every_n_steps). The host reads those values from the device
    there anyway, so whatever else makes it wait (reading a value, a collective) runs at these
    steps only, and the steps between queue their work on the device without a pause."""
    return step % trainer.log_every_n_steps == 0
