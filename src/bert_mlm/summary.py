"""The table of parameters printed at the start, without the FLOPs that Lightning's shows
as 0 (it counts them only for a module with an example input); train/mfu in TensorBoard
uses the model FLOPs per token instead (flops.py)."""

import logging

from lightning.pytorch.callbacks import ModelSummary

try:  # Lightning's private table maker (2.6): a later release may move it
    from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
except ImportError:
    _format_summary_table = None

log = logging.getLogger(__name__)


class ParameterSummary(ModelSummary):
    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:
        if _format_summary_table is None:  # Lightning's own table, FLOPs column and all
            return ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                          total_training_modes, total_flops, **kwargs)
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size,
                                      total_training_modes, total_flops, *columns)
        log.info("\n" + table.rsplit("\n", 1)[0])  # the last line is "0  Total Flops"
