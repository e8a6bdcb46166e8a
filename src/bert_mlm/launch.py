"""How this process runs: on what hardware, in what precision, started by what (a Hydra
sweep, torchrun, srun), and what that rules out."""

import logging
import os

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from bert_mlm.errors import UserError
from bert_mlm.workers import available_cores

# Set to 1 to run as on a CPU without native bf16 (tests and benchmarks of that path).
NO_BF16_ENV = "BERT_MLM_NO_BF16"
log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16, AMX, Arm BF16).
    Elsewhere bf16 is emulated, about 100x slower than fp32 (AMD EPYC with AVX2 only)."""
    return os.environ.get(NO_BF16_ENV, "") in ("", "0") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra sweep (`python -m train -m ...`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launched_world_size() -> int:
    """Processes started together by torchrun or srun (1 when run directly)."""
    return max(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("SLURM_NTASKS", 1)))


def launched_rank() -> int:
    """This process's rank among those torchrun or srun started (0 when run directly)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def started_by_srun() -> bool:
    """One of the tasks of a SLURM job, as Lightning tells: an interactive job (named bash or
    interactive) does not count, there Lightning starts the processes itself."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def check(strategy: str | None, multirun: bool, run_dir_given: bool) -> None:
    if any(kind in str(strategy) for kind in ("spawn", "fork", "notebook")):
        # A run validates, fits and validates again: three Lightning calls, each of which would
        # start its own processes (and they fail to start from here: "bad value(s) in fds_to_keep").
        raise UserError(f"trainer.strategy={strategy} is not supported: use trainer.strategy=ddp (as "
                        "trainer=ddp sets it), which starts one process per device once")
    if multirun and str(strategy).startswith("ddp"):
        # Lightning's DDP re-runs the script for each rank, which a Hydra sweep cannot
        # survive: the ranks hang (Lightning issue 11300, revert in PR 15737).
        raise UserError(
            "trainer=ddp cannot run inside a sweep (-m): sweep with trainer=gpu (one GPU per "
            "job), or start one DDP run per command"
        )
    if launched_world_size() > 1 and not run_dir_given:
        # Every process resolves its own ${now:...} run folder; they must share one.
        raise UserError(
            "under torchrun or srun all processes need one run folder: add hydra.run.dir=<folder>, "
            "e.g. hydra.run.dir=outputs/$SLURM_JOB_ID"
        )


def check_devices(accelerator: str, devices: int | str | list | None) -> None:
    gpu = accelerator in ("gpu", "cuda")
    if gpu and not torch.cuda.is_available():
        raise UserError("this trainer config asks for a GPU and none is visible: use trainer=cpu")
    available = torch.cuda.device_count() if gpu else available_cores()
    if isinstance(devices, int) and devices > available:
        kind = "GPUs" if gpu else "CPU cores"
        raise UserError(f"trainer.devices={devices} but this machine has {available} {kind}: lower it")


def precision(requested: str, accelerator: str) -> str:
    """`mixed`: bf16 autocast where the hardware runs bf16 natively; else fp16 with loss
    scaling on a GPU, and fp32 on a CPU (where emulated bf16 is slower than fp32)."""
    on_cpu = accelerator == "cpu"
    if requested != "mixed":
        # Lightning runs 16-mixed on a CPU as bf16-mixed (CPUs have no fp16 autocast): say so here.
        given = "bf16-mixed" if on_cpu and requested == "16-mixed" else requested
        if on_cpu and str(given).startswith("bf16") and not cpu_has_native_bf16():
            log.warning(f"trainer.precision={requested}: this CPU has no native bf16, so it is emulated "
                        "and many times slower than fp32; trainer.precision=32-true (or mixed) is faster")
        return given
    if on_cpu:
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
