"""An install as the README's "into an environment of your own" makes it: `pip install -e .`,
without the optional extras (pyproject.toml), trains; what needs an extra says which."""

import json
import sys

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins

from conftest import SMOKE, run, run_train_here

# What the extras bring: Hydra's plugins and what they import, and the bench's accelerate.
EXTRA_MODULES = ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_optuna_sweeper",
                 "hydra_plugins.hydra_submitit_launcher", "joblib", "optuna", "submitit", "accelerate")


def test_trains_without_the_optional_extras(tmp_path):
    # Each of those modules cannot be imported in this process, as where they are not installed.
    # (A module-level `import joblib` once ended every run there with ModuleNotFoundError.)
    script = (f"import runpy, sys\nfor name in {EXTRA_MODULES!r}: sys.modules[name] = None\n"
              f"sys.argv = ['train', 'hydra.run.dir={tmp_path / 'run'}', *{[*SMOKE, 'trainer.max_steps=2']!r}]\n"
              "runpy.run_module('train', run_name='__main__')\n")
    proc = run([sys.executable, "-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


@pytest.mark.parametrize("option, config, extra", [
    ("hydra/launcher=parallel", ("launcher", "joblib.yaml"), "parallel"),
    ("hydra/launcher=slurm", ("launcher", "submitit_slurm.yaml"), "slurm"),
    ("hparams_search=optuna", ("sweeper", "optuna.yaml"), "sweep"),
])
def test_an_option_whose_extra_is_not_installed_says_how_to_install_it(tmp_path, monkeypatch, option, config, extra):
    Plugins.instance()  # the plugins are imported, and their configs stored, once per process: now
    group, name = config
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"][group], name)  # as if its plugin were not installed
    proc = run_train_here(None, "-m", option, "experiment=smoke", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f'error: {option} needs the {extra} extra, which is not installed: pip install -e ".[{extra}]"']
    assert not (tmp_path / "sweep").exists()


def test_an_install_without_the_configs_says_how_to_install(tmp_path):
    # `pip install .` puts train.py in site-packages, far from conf/ (where --config-path points here)
    proc = run_train_here(tmp_path / "run", f"--config-path={tmp_path / 'conf'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: the configs (conf/) were not found: a plain `pip install .` copies src/ only; install the clone "
        "with `pip install -e .` instead"]
