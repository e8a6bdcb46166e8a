"""How many DataLoader worker processes mask and collate batches (data.num_workers=null)."""

import os

# Masking a batch takes milliseconds in one process: 8 of them feed any one GPU many times over.
MAX_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on: a SLURM job's or a container's share, not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_num_workers(gpu: bool, cores: int, processes: int) -> int:
    """Training on the CPU: 0. Its threads use every core, and masking in the training process
    costs about 0.1% of a CPU step (measured on 2 cores: ~10,000 sequences/s masked, ~10/s
    trained); a worker would take the same time from the same cores. On GPUs: each of the
    machine's `processes` training processes gets its share of the cores, less one for
    itself, between 1 and MAX_WORKERS."""
    if not gpu:
        return 0
    return max(1, min(MAX_WORKERS, cores // processes - 1))
