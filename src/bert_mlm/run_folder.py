"""A run folder's life: held by one run at a time, never taken over by a new run unless it
resumes or replaces the run there (overwrite=true, which keeps the earlier run until the new
one is accepted), and Hydra's record of the settings replaced only then."""

import fcntl
import itertools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bert_mlm.errors import UserError
from bert_mlm.launch import in_sweep

# What a run writes into its folder; `overwrite=true` removes these (`replacing`).
RUN_OUTPUTS = ("checkpoints", "hf_model", "metrics.json", "tensorboard", "tokenizer")
REPLACED = ".replaced"  # where they wait while a run with overwrite=true is checked
RECORD, NEW_RECORD = ".hydra", ".hydra-new"  # Hydra's record of the run's settings, and a new run's
RESTORE_WAIT_S = 30.0  # putting them back takes a few renames: a process still at it after this was killed
log = logging.getLogger(__name__)


_held: tuple[Path, int] | None = None  # the run folder this process holds, and its open descriptor


def output_dir_given(config: DictConfig) -> bool:
    """Whether output_dir names the run folder in place of Hydra's: its default is an
    interpolation (${hydra:runtime.output_dir}), in a run's config and in its .hydra/ record."""
    return not OmegaConf.is_interpolation(config, "output_dir")


def hold(folder: Path) -> None:
    """Refuses a folder that another run (a resubmitted job, a second terminal) still works
    in: two runs there would mix their checkpoints, logs and model. An exclusive flock on the
    folder, held until `release` or the process ends (however it ends)."""
    global _held
    if _held and _held[0] == folder:
        return
    release()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another run is still working in {folder}: wait for it to end (or stop it), or run in "
                        "another folder (hydra.run.dir=...)") from None
    except OSError:  # a file system without flock on folders (NFS emulates it only for files open to write)
        os.close(fd)
        log.debug(f"{folder} cannot be locked here: a second run in it would not be refused")
        return
    _held = folder, fd


def release() -> None:
    global _held
    if _held:
        os.close(_held[1])
        _held = None


def holds_run(folder: Path) -> bool:
    return ((folder / "metrics.json").exists() or (folder / "hf_model").exists()
            or any((folder / "checkpoints").glob("*.ckpt")))


def resumes(ckpt_path: str | None, folder: Path) -> bool:
    """Whether a run goes on from a checkpoint of the run in `folder`: ckpt_path=last or a file
    in it. Another run's checkpoint starts a new run here, which must not replace this one."""
    if ckpt_path is None:
        return False
    return ckpt_path == "last" or Path(ckpt_path).resolve().is_relative_to(folder.resolve())


def claim(folder: Path, resuming: bool, overwrite: bool, where: str = "hydra.run.dir") -> None:
    """Refuses a folder holding an earlier run unless the run resumes it or replaces it
    (`overwrite`: see `replacing`)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"the run folder {folder} is a file: give a folder (hydra.run.dir=...)")
    if resuming or not holds_run(folder):
        return
    if not overwrite:
        raise UserError(f"{folder} already holds a run: resume it with ckpt_path=last, start a new run "
                        f"in another folder ({where}=...), or replace it with overwrite=true")


@contextmanager
def replacing(folder: Path, keep: tuple[str, ...] = ()) -> Iterator[None]:
    """overwrite=true: the earlier run's outputs (but `keep`) are moved aside into .replaced/
    while the new run's data is checked (the body), then deleted. A run refused there, or
    stopped, gets them back; one killed there leaves them in .replaced/."""
    aside = folder / REPLACED
    _remove(aside)  # left by a run killed while replacing: the earlier run was being replaced
    moved = [name for name in RUN_OUTPUTS if name not in keep and (folder / name).exists()]
    aside.mkdir()
    for name in moved:
        (folder / name).rename(aside / name)
    try:
        yield
    except BaseException:
        put_back(folder)
        raise
    _remove(aside)


def put_back(folder: Path) -> None:
    """The earlier run's outputs from .replaced/ back into `folder`, over what a refused or
    killed replacing run began to write. The processes of a DDP run all try: the one whose
    rename takes .replaced/ restores it while the others wait, so all then see the same folder.
    What a process killed while restoring left (.replaced-PID/, still there after
    RESTORE_WAIT_S) is restored by the next."""
    mine = folder / f"{REPLACED}-{os.getpid()}"
    try:
        (folder / REPLACED).rename(mine)
    except OSError:  # none to put back, or another process took it
        deadline = time.monotonic() + RESTORE_WAIT_S
        while (taken := sorted(folder.glob(f"{REPLACED}-*"))) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not taken:
            return
        try:
            taken[0].rename(mine)
        except OSError:  # another process took it over first
            return
    for saved in sorted(mine.iterdir()):
        _remove(folder / saved.name)
        saved.rename(folder / saved.name)
    mine.rmdir()


def accept_record(folder: Path) -> None:
    """This run's record of its settings, written beside the folder's earlier one while the
    run could still be refused (see Preflight), becomes the folder's record."""
    if (folder / NEW_RECORD).is_dir():
        _remove(folder / RECORD)
        (folder / NEW_RECORD).rename(folder / RECORD)


def drop_new_record(hydra: DictConfig, folder: Path) -> None:
    """A run refused or stopped before accept_record: the folder's record stays as it was. A
    sweep's job in a folder without one keeps its own: the summary lists the job by it."""
    if hydra.output_subdir == NEW_RECORD and (folder / NEW_RECORD).is_dir():
        if (folder / RECORD).is_dir() or not in_sweep():
            _remove(folder / NEW_RECORD)
        else:
            (folder / NEW_RECORD).rename(folder / RECORD)


def keep_failed_log(folder: Path) -> None:
    """A new run in a folder where an earlier one failed before its first checkpoint: that
    run's TensorBoard log moves to tensorboard-<its time>/ (a run of its own to TensorBoard),
    so that the two runs' curves are not drawn as one."""
    log_dir = folder / "tensorboard"
    if log_dir.is_dir():
        when = time.localtime(log_dir.stat().st_mtime)
        kept = new_folder(log_dir.with_name(f"tensorboard-{time.strftime('%Y%m%d-%H%M%S', when)}"))
        log_dir.rename(kept)  # onto the empty folder just made
        log.warning(f"{folder} held the TensorBoard log of a run that saved no checkpoint: kept as {kept.name}/")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def new_folder(folder: Path) -> Path:
    """`folder`, made here, or if it exists already (another run started in the same second:
    a script's loop, a job array) folder_1, folder_2, ...: each run its own."""
    for n in itertools.count():
        candidate = folder.with_name(f"{folder.name}_{n}") if n else folder
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
