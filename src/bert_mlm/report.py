"""What a finished run reports: metrics.json, the exported model, TensorBoard's HPARAMS and
config, and the console summary."""

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from bert_mlm.module import VAL_METRICS, MLMModule
from bert_mlm.throughput import Throughput


def val_metrics(results: list[dict]) -> dict[str, float]:
    """What trainer.validate returned; nothing where validation is off (trainer.limit_val_batches=0)."""
    return {k: float(v) for k, v in results[0].items()} if results else {}


def finish_run(trainer: L.Trainer, module: MLMModule, cfg: DictConfig, before: dict[str, float],
               after: dict[str, float], wall_s: float) -> dict:
    """Writes what a run leaves (rank 0) and returns its metrics.json."""
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    metrics = {
        "before": before,
        "after": after,
        "train/tokens_per_sec": throughput and throughput.tokens_per_sec,
        "steps": trainer.global_step,
        "wall_s": wall_s,
        "world_size": trainer.world_size,
    }
    if trainer.is_global_zero:
        output_dir = Path(cfg.output_dir)
        module.model.save_pretrained(output_dir / "hf_model")
        # The tokenizer's limit as long as the model's (pipelines truncate and warn by it).
        module.tokenizer.model_max_length = module.model.config.max_position_embeddings
        module.tokenizer.save_pretrained(output_dir / "hf_model")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log_run(trainer, cfg, after)
        print_summary(metrics, output_dir)
    return metrics


def log_run(trainer: L.Trainer, cfg: DictConfig, after: dict[str, float]) -> None:
    """TensorBoard: the settings beside the final metrics (HPARAMS tab, to compare the
    jobs of a sweep) and the composed config (TEXT tab)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("output_dir")
    for logger in trainer.loggers:
        logger.log_hyperparams(settings, metrics={f"final/{k.split('/')[1]}": v for k, v in after.items()})
        if isinstance(logger, TensorBoardLogger):
            yaml = "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines())
            logger.experiment.add_text("config", yaml, trainer.global_step)
            logger.experiment.flush()


def print_summary(metrics: dict, output_dir: Path) -> None:
    before, after = metrics["before"], metrics["after"]
    rate = metrics["train/tokens_per_sec"]
    print()
    if after:
        print(f"{'':9}{'before':>11}{'after':>11}")
        for name in VAL_METRICS:
            print(f"{name:9}{before[name]:11.4g}{after[name]:11.4g}")
    else:
        print("no validation (trainer.limit_val_batches=0)")
    print(f"{metrics['steps']} steps in {metrics['wall_s']:.0f} s"
          + (f", {rate:,.0f} tokens/s" if rate else "") + f", {metrics['world_size']} process(es)")
    print(f"run folder: {output_dir}")
    print(f"model:      {output_dir / 'hf_model'}  (python -m fill_mask {output_dir} \"The [MASK] ...\")")
