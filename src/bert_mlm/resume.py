"""Resuming: which checkpoint `ckpt_path` names (or a requeued SLURM job resumes from), and
whether it fits the model and the data."""

import logging
from pathlib import Path

import torch

from bert_mlm.checkpoints import last_checkpoint
from bert_mlm.data import MLMDataModule
from bert_mlm.errors import UserError
from bert_mlm.module import MLMModule
from bert_mlm.pretrained import load_tokenizer
from bert_mlm.requeue import requeued_checkpoint

log = logging.getLogger(__name__)
OPTIMIZER_SETTINGS = ("lr", "weight_decay", "betas", "eps")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def resolve(ckpt_path: str | None, output_dir: Path, sweep_job: bool = False) -> str | None:
    """The checkpoint to resume from: a requeued SLURM job's last.ckpt (its command is the
    first attempt's), else ckpt_path (a file there: checked with the config), `last` being the
    run folder's last.ckpt. In a sweep run again with ckpt_path=last, a job that saved none
    yet (the sweep stopped before it) starts afresh."""
    requeued = requeued_checkpoint(output_dir)
    if requeued:
        return str(requeued)
    if ckpt_path != "last":
        return ckpt_path
    last = last_checkpoint(output_dir)
    if last.is_file():
        return str(last)
    if sweep_job:
        log.info(f"{last} does not exist: this job of the sweep starts afresh")
        return None
    raise UserError(f"checkpoint {last} does not exist: check hydra.run.dir (ckpt_path=last resumes the run there)")


def _check_vocabulary(saved: str | None, module: MLMModule) -> None:
    """Refuses to go on with another vocabulary than the checkpoint's run had: of another size
    its embeddings would not fit, of the same size every token id would mean another word."""
    try:
        theirs = load_tokenizer(saved).get_vocab() if saved else None
    except UserError:  # moved or deleted since, or on the hub and offline: the shapes must tell
        return
    if theirs is not None and theirs != module.tokenizer.get_vocab():
        raise UserError(f"the checkpoint's run had another vocabulary ({saved}): resume with its model.tokenizer, "
                        "and tokenizer.train=true if that run trained its own")


def check_fits(ckpt_path: str, module: MLMModule, datamodule: MLMDataModule, max_steps: int,
               finished: bool = False) -> int:
    """Refuses a checkpoint that cannot be read, of another model size, of a run on other
    data settings (its DataLoader position would be restored over other batches), or already
    at `max_steps` of a `finished` run (nothing to train: its metrics.json would be rewritten
    without figures), before anything runs. At max_steps of a run stopped during its final
    validation or export, it goes on to those. Returns the checkpoint's step."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)
        saved = checkpoint["state_dict"]
    except Exception as err:  # not a zip of tensors, cut short, or no model in it: unusable alike
        raise UserError(
            f"{ckpt_path} (ckpt_path) cannot be read as a checkpoint: it is not one, or was cut short by an "
            "interrupted write or copy; resume from an older one (ckpt_path=FILE) or start a fresh run without it"
        ) from err
    saved_hp = checkpoint.get("hyper_parameters", {})
    _check_vocabulary(saved_hp.get("tokenizer") or saved_hp.get("pretrained"), module)
    ours = module.state_dict()
    wrong = [k for k in ours if k not in saved or saved[k].shape != ours[k].shape]
    if wrong:
        raise UserError(
            f"checkpoint {ckpt_path} is of another model ({len(wrong)} tensors differ, e.g. {wrong[0]}): "
            "resume with the model settings it was trained with"
        )
    # Lightning restores these with the optimizer's state (its param groups, the schedule's
    # base lr): another value given now would be silently ignored.
    ignored = [f"model.{k}={saved_hp[k]}" for k in OPTIMIZER_SETTINGS
               if k in saved_hp and _plain(saved_hp[k]) != _plain(module.hparams[k])]
    if ignored:
        raise UserError(f"the checkpoint's run was trained with {', '.join(ignored)}, which resuming restores with "
                        "the optimizer's state: resume with it, or start a new run from its weights "
                        "(model.pretrained=<run>/hf_model)")
    # Lightning keeps a datamodule's state_dict under its class name (none in older checkpoints).
    changed = datamodule.changed_settings(checkpoint.get(type(datamodule).__qualname__, {}))
    if changed:
        raise UserError(f"the checkpoint's run was trained with {', '.join(changed)}: resume with its data "
                        "settings, or start a new run from its weights (model.pretrained=<run>/hf_model)")
    step = checkpoint["global_step"]
    log.info(f"resuming from {ckpt_path} (step {step})")
    if finished and 0 < max_steps <= step:
        raise UserError(f"{ckpt_path} is at step {step}, the run's end (trainer.max_steps="
                        f"{max_steps}): raise trainer.max_steps to train on")
    if 0 < max_steps < step:  # Lightning would stop at once and call the run done at `step`
        raise UserError(f"{ckpt_path} is at step {step}, past trainer.max_steps={max_steps}: resume with "
                        f"trainer.max_steps={step} or more")
    return step
