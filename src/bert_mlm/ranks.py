"""Which process is which in a run of several (DDP, torchrun, srun): one line per rank."""

import logging
import zlib

import lightning as L
import torch

log = logging.getLogger(__name__)


def checksum(*tensors: torch.Tensor) -> int:
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.cpu().numpy().tobytes(), crc)
    return crc


class RankReport(L.Callback):
    """On every rank of a run of several processes, logs its global rank, machine (node) and
    rank on that machine, its share of the training batches, and a checksum of the first
    batch it trains on, tokens and masks: ranks that read the same data show the same one."""

    def __init__(self):
        self._pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule):
        self._pending = trainer.world_size > 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: dict, batch_idx: int):
        if not self._pending:
            return
        self._pending = False
        log.info(f"rank {trainer.global_rank} of {trainer.world_size} (node {trainer.node_rank}, local rank "
                 f"{trainer.local_rank}): {trainer.num_training_batches} batches an epoch; first batch "
                 f"{checksum(batch['input_ids'], batch['labels']):08x}")
