import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
# No hub at test time: hub names fail at once instead of retrying the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)

# A run of a few seconds: a tiny model on short blocks (experiment=smoke).
SMOKE = ["experiment=smoke", "logger=none", "data.num_workers=0"]


@pytest.fixture
def cfg_of(tmp_path):
    """Composes conf/train.yaml with overrides, writing into tmp_path."""

    def _compose(*overrides: str):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose(
                "train",
                overrides=[f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", *overrides],
            )

    return _compose


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **OFFLINE}, cwd=cwd
    )


def run_train(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m train` as a user runs it, in its own process."""
    return run([sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", *overrides], run_dir.parent, timeout)


def run_train_here(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m train` run in this process: the command line's exit status and output
    without the seconds of importing torch again (for the many bad-input cases)."""
    import contextlib
    import io

    import train
    from hydra.core.global_hydra import GlobalHydra

    out, err = io.StringIO(), io.StringIO()
    # In-process Hydra resolves config_path against the module `train`, not its file: name it.
    flags = [o for o in overrides if o.startswith("-")]  # e.g. -m: before the overrides
    argv = ["train", f"--config-path={CONF}", *flags, f"hydra.run.dir={run_dir}",
            *(o for o in overrides if o not in flags)]
    saved_argv, sys.argv = sys.argv, argv
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def last_error(proc: subprocess.CompletedProcess) -> str:
    """The last line on stderr, which for bad input is the `error:` line."""
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]
