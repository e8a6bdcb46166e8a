"""A time budget (trainer.max_time): the learning rate follows the elapsed share of it, the
run stops on time with its checkpoint and export, and a resumed run goes on from the saved
elapsed time. Step-based runs keep the schedule they had."""

import json
import math
from types import SimpleNamespace

import lightning as L
import lightning.pytorch.callbacks.timer as timer_module
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from bert_mlm.errors import UserError
from bert_mlm.schedule import lr_factor, lr_schedule
from conftest import SMOKE, run_train_here
from test_module import make_batch, tiny_module


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_without_a_budget_the_schedule_is_transformers_linear_one():
    # Float for float: runs and checkpoints from before the budget existed train as they did.
    for warmup in (0, 1, 4, 10, 50):
        for total in (1, 10, 40, 1000):
            hf = get_linear_schedule_with_warmup(optimizer(), warmup, total).lr_lambdas[0]
            assert [lr_factor(s, warmup, total) for s in range(total + 2)] == [hf(s) for s in range(total + 2)]


def test_cosine_and_wsd_decays_share_the_warm_up_and_the_end():
    # warm-up over 10 steps, then 100 steps of decay; (step, linear, cosine, wsd)
    expected = [(5, 0.5, 0.5, 0.5), (10, 1.0, 1.0, 1.0), (60, 0.5, 0.5, 1.0), (90, 0.2, 0.5 * (1 - math.cos(0.2 * math.pi)), 1.0),
                (100, 0.1, 0.5 * (1 - math.cos(0.1 * math.pi)), 0.5), (110, 0.0, 0.0, 0.0), (120, 0.0, 0.0, 0.0)]
    for step, *lrs in expected:
        assert [lr_factor(step, 10, 110, decay=d) for d in ("linear", "cosine", "wsd")] == pytest.approx(lrs, abs=1e-12)
    # With a budget, its elapsed share ends the decay just as the steps do: 90% gone leaves 10%.
    assert lr_factor(20, 10, math.inf, time_share=0.9, decay="wsd") == pytest.approx(0.5)
    # model.cooldown: wsd's decay over the last half instead of the last 20%.
    assert [lr_factor(s, 10, 110, decay="wsd", cooldown=0.5) for s in (50, 60, 85, 110)] == pytest.approx([1, 1, 0.5, 0])


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """Lightning's Timer reads this clock: set clock[0] to the seconds that have passed."""
    now = [0.0]
    monkeypatch.setattr(timer_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def budget_schedule(timer: Timer, warmup: int, total: float = math.inf, **kwargs):
    opt = optimizer(lr=2.0)
    return opt, lr_schedule(opt, warmup, total, timer, **kwargs)


def lrs_at(opt, schedule, clock, points: list[tuple[int, float]]) -> list[float]:
    """The lr the schedule sets after step s when t seconds have passed, for each (s, t)."""
    lrs = []
    for step, seconds in points:
        clock[0] = seconds
        while schedule.last_epoch < step:
            schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_lr_follows_the_elapsed_share_of_the_budget(clock):
    timer = Timer(duration={"seconds": 100})
    opt, schedule = budget_schedule(timer, warmup=10)
    timer.on_train_start(None, None)
    # 0 %, mid warm-up (by steps), its end at 2 % of the budget, 50 %, 100 %, past the end.
    lrs = lrs_at(opt, schedule, clock, [(0, 0), (5, 1), (10, 2), (300, 50), (600, 100), (601, 103)])
    assert lrs == pytest.approx([0.0, 1.0, 2.0 * 0.98, 1.0, 0.0, 0.0])


def test_steps_or_budget_whichever_ends_first(clock):
    timer = Timer(duration={"seconds": 100})
    opt, schedule = budget_schedule(timer, warmup=0, total=200)
    timer.on_train_start(None, None)
    # At step 50 the budget is 10 % gone, the steps 25 %; at step 100, 80 % against 50 %.
    assert lrs_at(opt, schedule, clock, [(50, 10), (100, 80)]) == pytest.approx([2.0 * 0.75, 2.0 * 0.2])


def test_a_restored_timer_goes_on_from_its_saved_time_and_rank_0_sets_the_time(clock):
    timer = Timer(duration={"seconds": 100})
    timer.load_state_dict({"time_elapsed": {"train": 60.0}})  # as Lightning restores a checkpoint
    opt, schedule = budget_schedule(timer, warmup=10)
    clock[0] = 1000.0
    timer.on_train_start(None, None)
    assert lrs_at(opt, schedule, clock, [(40, 1010)]) == pytest.approx([2.0 * 0.3])  # 70 s of 100
    # Under DDP every rank takes rank 0's elapsed time (here: 90 s) instead of its own clock's,
    # asked every `share_every` steps only (a broadcast waits for the device): 3 of steps 0-10.
    asked = []
    opt, schedule = budget_schedule(timer, warmup=10, broadcast=lambda seconds: asked.append(seconds) or 90.0,
                                    share_every=5)
    assert lrs_at(opt, schedule, clock, [(10, 1010)]) == pytest.approx([2.0 * 0.1]) and len(asked) == 3
    asked.clear()
    assert lrs_at(opt, schedule, clock, [(14, 1010)]) == pytest.approx([2.0 * 0.1]) and asked == []


def test_the_schedule_state_resumes_exactly_and_loads_without_pickles(tmp_path):
    opt = optimizer(lr=2.0)
    schedule = lr_schedule(opt, 4, 20)
    for _ in range(7):
        schedule.step()
    torch.save(schedule.state_dict(), tmp_path / "s.pt")
    opt2 = optimizer(lr=2.0)
    resumed = lr_schedule(opt2, 4, 20)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))  # as train.py resumes
    for _ in range(5):
        schedule.step()
        resumed.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_no_end_is_an_error_unless_there_is_a_budget():
    module = tiny_module()
    data = DataLoader([make_batch(module, seed=s) for s in range(2)], batch_size=None)
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, max_steps=-1, max_epochs=-1)
    with pytest.raises(UserError, match="training has no end: .*trainer.max_time"):
        L.Trainer(**quiet).fit(module, data)
    trainer = L.Trainer(**quiet, max_time={"seconds": 1})
    trainer.fit(module, data)  # epoch after epoch, until the second is up
    assert trainer.global_step >= 1 and trainer.optimizers[0].param_groups[0]["lr"] < 0.01 * module.hparams.lr


def test_a_budget_without_a_step_limit_validates_by_time(cfg_of):
    from bert_mlm.cadence import validation_cadence

    def interval(*overrides):
        return validation_cadence(cfg_of(*overrides).trainer)["val_check_interval"]

    assert interval("trainer.max_steps=-1", "trainer.max_time=00:00:10:00") == {"seconds": 300}  # halfway
    assert interval("trainer.max_steps=-1", "trainer.max_time={days: 1}") == {"seconds": 3600}  # hourly
    assert interval("trainer.max_time=00:00:10:00") == 20  # max_steps=40 is a step count to halve
    assert interval("trainer.max_steps=-1", "trainer.max_time=00:00:10:00", "trainer.val_check_interval=7") == 7


@pytest.mark.parametrize("budget", ["0:1:0:0", "{hour: 1}"])
def test_a_wrong_budget_is_refused_at_the_start(cfg_of, budget):
    from bert_mlm.checks import check_config

    with pytest.raises(UserError, match=r"^trainer\.max_time="):
        check_config(cfg_of(f"trainer.max_time={budget}"))


def test_a_stream_may_end_by_its_budget(cfg_of):
    from train import build

    stream = [*SMOKE, "data.streaming=true", "trainer.max_steps=-1"]
    with pytest.raises(UserError, match="stream of unknown length: .*trainer.max_time"):
        build(cfg_of(*stream))
    _, _, trainer = build(cfg_of(*stream, "trainer.max_time={minutes: 1}"))
    assert trainer.max_steps == -1 and any(isinstance(c, Timer) for c in trainer.callbacks)


BUDGET_RUN = [*SMOKE, "trainer.max_steps=-1", "trainer.limit_val_batches=2"]


def saved(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """`python -m train` told to train for 4 seconds, whatever its step count."""
    tmp_path = tmp_path_factory.mktemp("budget")
    run_dir, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    proc = run_train_here(run_dir, *BUDGET_RUN, "trainer.max_time={seconds: 4}", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, cache, proc


def test_a_budget_run_stops_on_time_annealed_with_its_outputs(budget_run):
    run_dir, _, proc = budget_run
    ckpt = saved(run_dir)
    elapsed = ckpt["callbacks"]["Timer"]["time_elapsed"]["train"]
    # Stopped after the step that passed 4 s and the validation Lightning runs at a stop.
    assert 4 <= elapsed < 4 + 20
    # The lr the schedule set after the last step, when the budget was up.
    assert ckpt["global_step"] >= 1 and ckpt["lr_schedulers"][0]["_last_lr"][0] < 0.01 * ckpt["hyper_parameters"]["lr"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == ckpt["global_step"] and math.isfinite(metrics["after"]["val/loss"])
    assert (run_dir / "hf_model" / "model.safetensors").is_file()
    assert "/4 s [" in proc.stdout  # the bar counts the budget's seconds


def test_a_resumed_budget_run_goes_on_from_the_saved_time(budget_run, cfg_of):
    from train import build

    run_dir, cache, _ = budget_run
    before = saved(run_dir)["callbacks"]["Timer"]["time_elapsed"]["train"]
    budget = math.ceil(before) + 4  # a longer budget: 4 s more to train
    seen = []  # (elapsed s, lr) at the start of each step

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
            seen.append((timer.time_elapsed(), trainer.optimizers[0].param_groups[0]["lr"]))

    cfg = cfg_of(*BUDGET_RUN, f"trainer.max_time={{seconds: {budget}}}", cache)
    module, datamodule, trainer = build(cfg, callbacks=[Record()])
    trainer.fit(module, datamodule, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)
    peak = module.hparams.lr
    assert len(seen) >= 2 and seen[0][0] >= before  # the clock goes on from the saved time
    # Each lr was set after the step before it, between the starts of those two steps: had the
    # clock started again, the lr would be back near the peak.
    for (t0, _), (t1, lr) in zip(seen, seen[1:]):
        assert peak * (1 - t1 / budget) - 1e-12 <= lr <= peak * (1 - t0 / budget) + 1e-12
