"""Keep freed memory in the process on CPUs: glibc's malloc gives large freed buffers back to
the operating system, so every training step maps fresh pages for its activations and
gradients (tens of MB each) and page-faults through them again. Here buffers up to 32 MB
come from the heap and freed ones stay there (docs/performance-notes.md's lever table has the effect)."""

import ctypes
import logging
from typing import Annotated

import lightning as L
from pydantic import Field, NonNegativeInt

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
log = logging.getLogger(__name__)


class KeepFreedMemory(L.Callback):
    def __init__(self, mmap_threshold_mb: Annotated[int, Field(ge=0, le=32)] = 32,  # glibc's largest allowed
                 trim_threshold_mb: NonNegativeInt = 1024):
        self.mmap_threshold = mmap_threshold_mb * 2**20
        self.trim_threshold = trim_threshold_mb * 2**20

    def setup(self, trainer, pl_module, stage):
        if trainer.strategy.root_device.type != "cpu":
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(M_MMAP_THRESHOLD, self.mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, self.trim_threshold)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
            return
        if not ok:
            log.warning("mallopt refused the allocator settings: training runs with glibc's defaults")
