import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
# No hub at test time: hub names fail at once instead of retrying the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)

# A run of a few seconds: a tiny model on short blocks (experiment=smoke).
SMOKE = ["experiment=smoke", "logger=none", "data.num_workers=0"]


def pytest_collection_modifyitems(items):
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a GPU"))


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


def run(command: list[str], cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **OFFLINE, **(env or {})},
        cwd=cwd,
    )


def run_train(run_dir: Path, *overrides: str, timeout: int = 300, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """`python -m train` as a user runs it, in its own process (`env`: added to this one's)."""
    return run([sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", *overrides], run_dir.parent, timeout,
               env)


def wait_for(path: Path, *procs: subprocess.Popen, timeout: float = 240) -> None:
    """Until `path` exists, while all of `procs` run."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def final_state(run_dir: Path) -> tuple[dict, dict]:
    """What an exact resume must reproduce: metrics.json but its timings, and the weights."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for timing in ("wall_s", "train/tokens_per_sec"):
        metrics.pop(timing)
    return metrics, load_file(run_dir / "hf_model" / "model.safetensors")


def assert_same(a, b):
    assert a[0] == b[0]  # metrics before and after, steps: bitwise equal floats
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def steps_shown(stdout: str, total: int = 40) -> int:
    """The newest step the progress bar showed ("12/40")."""
    return max(int(n) for n in re.findall(rf"\b(\d+)/{total}\b", stdout))


def run_train_here(run_dir: Path | None, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m train` run in this process: the command line's exit status and output
    without the seconds of importing torch again (for the many bad-input cases). Without
    `run_dir`, Hydra's own timestamped folder."""
    import contextlib
    import io

    import train
    from hydra.core.global_hydra import GlobalHydra

    out, err = io.StringIO(), io.StringIO()
    # In-process Hydra resolves config_path against the module `train`, not its file: name it.
    flags = [o for o in overrides if o.startswith("-")]  # e.g. -m: before the overrides
    argv = ["train", f"--config-path={CONF}", *flags, *([f"hydra.run.dir={run_dir}"] if run_dir else []),
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
