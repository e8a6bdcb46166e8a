"""How `python -m train` ends when it does not finish: one `error:` line for what the user
can fix, and the command that resumes a run a signal stopped."""

import errno
import logging
import shlex
import sys

from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException

from bert_mlm import corpus
from bert_mlm.checkpoints import last_checkpoint
from bert_mlm.errors import UserError, causes
from bert_mlm.launch import in_sweep


def user_message(err: BaseException | None, data_files: list[str] = ()) -> str | None:
    """What to tell the user about `err`, when it is theirs to fix (None: a bug, show it all).
    `data_files`: the run's data files, to name the one a decoding error came from."""
    return next((m for e in causes(err) if (m := _message(e, data_files)) is not None), None)


def _message(err: BaseException, data_files: list[str]) -> str | None:
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, MisconfigurationException):  # Lightning's word on a trainer.* setting
        return " ".join(str(err).split())
    if isinstance(err, UnicodeDecodeError):  # a streamed data file, read only as training reads it
        return str(corpus.not_utf8(err, data_files))
    if isinstance(err, (FileExistsError, NotADirectoryError)):  # a folder setting naming a file
        return f"{err.filename} is a file where a folder is needed: check the paths given (e.g. data.cache_dir)"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return (f"no space left on the device while writing {err.filename or 'a file'}: free some "
                "space (checkpoints are written whole or not at all: the last complete one is intact)")
    return None


def record_in_log(line: str) -> None:
    """`line` in the run's train.log too (not again on the console): a sweep job's reason to
    fail is then kept beside it, after the console has scrolled on."""
    record = logging.LogRecord("train", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def resume_overrides(task: list[str], output_dir: str) -> list[str]:
    """The overrides of the run, or sweep job, that resume it from its run folder. A job of an
    Optuna search (hparams_search=, which makes a command a sweep) resumes as a single run."""
    dropped = ("ckpt_path=", "overwrite=", "hparams_search=")
    return [*(o for o in task if not o.startswith(dropped)), "ckpt_path=last", f"hydra.run.dir={output_dir}"]


def print_resume_command(output_dir: str, stopped_by: str, replacing: bool = False) -> None:
    """After a stop by a signal: the command that goes on from checkpoints/last.ckpt; or, for
    an overwrite=true stopped before it replaced the earlier run (`replacing`), that run is there."""
    if replacing:
        print(f"stopped by {stopped_by} before this run replaced the earlier one: {output_dir} holds that run "
              "as it was; the same command again (overwrite=true) replaces it", file=sys.stderr)
        return
    last = last_checkpoint(output_dir)
    if not last.exists():
        print(f"stopped by {stopped_by}; no {last} was written (nothing trained yet, or callbacks.last "
              "left out): nothing to resume", file=sys.stderr)
        return
    hydra = HydraConfig.get()
    command = " ".join(shlex.quote(o) for o in resume_overrides(hydra.overrides.task, output_dir))
    print(f"stopped by {stopped_by}; {last} holds the newest state. Resume with:\n"
          f"  python -m train {command}", file=sys.stderr)
    if in_sweep():
        print(f"or {finish_sweep_line(hydra.sweep.dir)}", file=sys.stderr)


def finish_sweep_line(sweep_dir: str) -> str:
    return (f"finish the whole sweep: its command again with ckpt_path=last hydra.sweep.dir={sweep_dir} "
            "(finished jobs stand, the others resume or start)")
