"""One DDP run of two processes (gloo on the CPU) started three ways on this machine:
Lightning's own launcher, torchrun as two nodes, and the environment srun sets. The runs
started by torchrun and srun are interrupted and resumed, and must end bit for bit where
the uninterrupted run of Lightning's launcher ends."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bert_mlm.errors import UserError
from bert_mlm.interrupt import StopTogether
from bert_mlm.launch import check
from bert_mlm.preflight import Preflight
from bert_mlm.requeue import Requeue, SlurmWarning
from conftest import (CONF, SMOKE, assert_same, final_state, last_error, run_train, run_train_here, saved_step,
                      steps_shown, wait_for)

# 17 validation blocks in batches of 8: rank 0 validates 2 batches, rank 1 one (no block twice).
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "data.val_max_blocks=17"]
# One thread per process: each rank's sums then do not depend on the machine's cores (Lightning's
# launcher gives each process cores / processes, torchrun each node all of them).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
EVERY = "callbacks.last.every_n_steps=2"  # the runs to interrupt save early: at step 2 of 10
RANK0, RANK1 = "rank 0 of 2 (node 0, local rank 0)", "rank 1 of 2 (node 0, local rank 1)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process with its output in LOG.out and LOG.err (a pipe could fill while another
    process is awaited)."""
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, **ONE_THREAD, **env},
                                cwd=log.parent)


def kill_machines(agents: list[subprocess.Popen]) -> None:
    """SIGKILL to each torchrun and all its descendants at once, as when the machines are lost
    (torchrun starts each worker in a session of its own: killing its group would leave the
    workers training)."""
    pids = [a.pid for a in agents]
    for pid in pids:  # grows as it goes: every descendant
        for thread in Path(f"/proc/{pid}/task").glob("*"):
            pids += [int(child) for child in (thread / "children").read_text().split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    while any(_running(pid) for pid in pids):
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's end waits for init to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def finish(procs: list[subprocess.Popen]) -> list[int]:
    return [p.wait(timeout=300) for p in procs]


def output(log: Path) -> str:
    return log.with_suffix(".out").read_text() + log.with_suffix(".err").read_text()


def ranks(text: str) -> dict[str, str]:
    """What each rank logged of itself (bert_mlm.ranks): "rank 1 of 2 (node 1, local rank 0)"
    -> the checksum of its first batch, tokens and masks."""
    return dict(re.findall(r"(rank \d of \d \(node \d, local rank \d\)): \d+ batches an epoch; first batch (\w+)",
                           text))


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> SimpleNamespace:
    """trainer.devices=2: Lightning's launcher starts the second process. The data is prepared
    first, as the README says for a large corpus, so no rank tokenizes."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    run_dir, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    prepared = run_train(run_dir, *SMOKE, cache, "prepare_only=true")
    assert prepared.returncode == 0 and "Tokenizing" in prepared.stderr, prepared.stderr[-3000:]
    proc = run_train(run_dir, *SMOKE, *DDP, "trainer.devices=2", "logger=tensorboard", cache, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(tmp_path=tmp_path, run_dir=run_dir, cache=cache, proc=proc, ranks=ranks(proc.stdout))


def test_lightning_launcher(lightning_run):
    tmp_path, run_dir, proc = lightning_run.tmp_path, lightning_run.run_dir, lightning_run.proc
    assert "Tokenizing" not in proc.stderr and "sync_dist=True" not in proc.stderr  # summed over ranks already
    assert "DistributedSampler" not in proc.stderr  # Lightning's warning of repeated validation blocks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no stray run folders
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 10
    assert metrics["after"]["val/loss"] < metrics["before"]["val/loss"]
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()] == []
    # All event files come from one process (the pid is in their names): rank 0 logs alone.
    assert len({p.name.split(".")[4] for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")}) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran, in the same folder
    assert sorted(lightning_run.ranks) == [RANK0, RANK1]
    assert lightning_run.ranks[RANK0] != lightning_run.ranks[RANK1]  # each rank its own data and masks


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_to_every_process_stops_all_at_one_step_and_resumes_exactly(tmp_path, lightning_run, signum):
    """What a terminal's Ctrl-C, scancel or Kubernetes do: the signal reaches every rank (and
    Lightning's launcher passes it on again): all stop at the same step, save, and say so once."""
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_dir.mkdir()
    args = [*SMOKE, *DDP, "trainer.devices=2", "logger=tensorboard", lightning_run.cache, f"hydra.run.dir={run_dir}"]
    with (tmp_path / "out").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "train", *args, EVERY], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **ONE_THREAD}, cwd=tmp_path, start_new_session=True)
        try:
            wait_for(last, proc)
            os.killpg(proc.pid, signum)
            assert proc.wait(timeout=120) == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
        finally:  # a hung run's processes, all of them
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "out").read_text()
    assert out.count("stopped by ") == 1 and "ckpt_path=last" in out, out[-3000:]
    assert 2 <= saved_step(last) < 10
    resumed = run_train(run_dir, *args, "ckpt_path=last", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(final_state(run_dir), final_state(lightning_run.run_dir))


def torchrun_node(node: int, port: int, run_dir: Path, attempt: int, *overrides: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "train", *SMOKE,
               *DDP, "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={run_dir}", *overrides]
    return start(command, {}, run_dir.parent / f"node{node}-{attempt}")


def test_torchrun_two_nodes_killed_and_resumed(tmp_path, lightning_run):
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_dir.mkdir()
    cache = f"data.cache_dir={tmp_path / 'cache'}"  # a new one: the nodes prepare it
    port = free_port()
    nodes = [torchrun_node(n, port, run_dir, 0, cache, EVERY) for n in (0, 1)]
    wait_for(last, *nodes)
    kill_machines(nodes)
    finish(nodes)
    assert 0 < saved_step(last) < 10 and not (run_dir / "metrics.json").exists()
    first = [output(tmp_path / f"node{n}-0") for n in (0, 1)]
    # Preparing the data cache is per node: the first process of each (LOCAL_RANK 0) tokenized.
    assert all("Tokenizing" in out for out in first)
    # Global ranks across nodes; each rank reads the shard, and draws the masks, it has under
    # Lightning's launcher on one machine.
    assert ranks(first[0]) == {RANK0: lightning_run.ranks[RANK0]}
    assert ranks(first[1]) == {"rank 1 of 2 (node 1, local rank 0)": lightning_run.ranks[RANK1]}

    port = free_port()
    nodes = [torchrun_node(n, port, run_dir, 1, cache, EVERY, "ckpt_path=last") for n in (0, 1)]
    assert finish(nodes) == [0, 0], output(tmp_path / "node0-1")[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cache", "run"]  # one run folder
    assert_same(final_state(run_dir), final_state(lightning_run.run_dir))  # world_size 2 included
    # Global rank 0 alone writes checkpoints: node 1's rank takes part in each save, writes nothing.
    # (The resumed attempt's log: the first may be killed between a save and its log line.)
    assert "saved " in output(tmp_path / "node0-1") and "saved " not in first[1] + output(tmp_path / "node1-1")


def srun_task(rank: int, port: int, run_dir: Path, restarts: int, *overrides: str) -> subprocess.Popen:
    """One of the two tasks `srun` starts for `#SBATCH --nodes=1 --ntasks-per-node=2`, with the
    environment it sets (SLURM_RESTART_COUNT: SLURM's count of requeues); `scontrol` is the
    stub in run_dir/../bin."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bert-mlm", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "SLURM_NODELIST": "localhost",  # Lightning's MASTER_ADDR: the first node
           "MASTER_PORT": str(port),  # else Lightning derives it from the job id, the same in every test run
           "PATH": f"{run_dir.parent / 'bin'}:{os.environ['PATH']}",
           **({"SLURM_RESTART_COUNT": str(restarts)} if restarts else {})}
    command = [sys.executable, "-m", "train", *SMOKE, *DDP, "trainer.devices=2", f"hydra.run.dir={run_dir}",
               *overrides]
    return start(command, env, run_dir.parent / f"task{rank}-{restarts}")


def test_srun_warned_before_the_time_limit_requeues_and_resumes_exactly(tmp_path, lightning_run):
    (tmp_path / "bin").mkdir()
    calls = tmp_path / "scontrol-calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_dir.mkdir()
    port = free_port()
    tasks = [srun_task(r, port, run_dir, 0, lightning_run.cache, EVERY) for r in (0, 1)]
    wait_for(last, *tasks)
    for task in tasks:  # `#SBATCH --signal=SIGUSR1@120` signals every task
        task.send_signal(signal.SIGUSR1)
    assert finish(tasks) == [128 + signal.SIGUSR1] * 2, output(tmp_path / "task0-0")[-3000:]
    out = output(tmp_path / "task0-0")
    assert "stopped by SLURM's warning (SIGUSR1)" in out and "requeued SLURM job 4242" in out
    assert "SLURM auto-requeueing enabled" not in out  # Lightning's handler is not the one set
    assert calls.read_text() == "requeue 4242\n"  # once: by global rank 0, after the save
    # Saved where training stopped, after the periodic save at step 2: nothing lost.
    assert 2 < saved_step(last) == steps_shown(out, total=10) < 10
    assert not list(run_dir.glob("hpc_ckpt_*")) and not (run_dir / "metrics.json").exists()

    # SLURM starts the same command again, as it was.
    port = free_port()
    tasks = [srun_task(r, port, run_dir, 1, lightning_run.cache, EVERY) for r in (0, 1)]
    assert finish(tasks) == [0, 0], output(tmp_path / "task0-1")[-3000:]
    assert output(tmp_path / "task0-1").count(f"resuming from {last}") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["bin", "run"]  # one run folder
    assert_same(final_state(run_dir), final_state(lightning_run.run_dir))
    assert calls.read_text() == "requeue 4242\n"


@pytest.mark.parametrize("world_size", [1, 2])
def test_stop_signals_and_slurms_warning_are_asked_in_one_collective_a_step(world_size):
    # Each collective makes the host wait for the device: one a step for both, none mid-step.
    reduced = []

    def reduce(flags, reduce_op):
        reduced.append(flags.tolist())
        return flags * world_size  # as if every rank had noted the same

    trainer = SimpleNamespace(world_size=world_size, global_step=0, received_sigterm=False, is_global_zero=True,
                              strategy=SimpleNamespace(reduce=reduce, root_device=torch.device("cpu")))
    stops = StopTogether()
    stops.warning = SlurmWarning("4242")
    stops.on_train_start(trainer, None)
    for batch, step in enumerate([0, 1, 1, 2]):  # accumulating: the first batch ends no step, then two a step
        trainer.global_step = step
        stops.on_train_batch_end(trainer, None, None, None, batch)
    assert reduced == ([] if world_size == 1 else [[0, 0], [0, 0]])
    stops.noted = stops.warning.warned = True
    trainer.global_step = 3
    with pytest.raises(Requeue) as raised:  # the warning first: the requeued job goes on
        stops.on_train_batch_end(trainer, None, None, None, 4)
    assert raised.value.job_id == "4242" and reduced[2:] == ([] if world_size == 1 else [[1, 1]])
    stops.warning.warned = False
    trainer.global_step = 4
    with pytest.raises(SIGTERMException):
        stops.on_train_batch_end(trainer, None, None, None, 5)


def test_a_used_folder_is_refused_on_every_machine_and_cleared_by_none_before_the_run_is_built(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "hf_model").mkdir(parents=True)  # an earlier run's
    with initialize_config_dir(str(CONF), version_base="1.3"):
        config = compose("train", overrides=[*SMOKE, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
        replace = compose("train", overrides=[*SMOKE, f"hydra.run.dir={run_dir}", "overwrite=true"],
                          return_hydra_config=True)
    monkeypatch.setenv("NODE_RANK", "1")  # Lightning's launcher, second machine: LOCAL_RANK unset
    with pytest.raises(SystemExit):  # refused on this machine too, not left waiting for rank 0
        Preflight().on_run_start(config)
    monkeypatch.setenv("NODE_RANK", "0")
    Preflight().on_run_start(replace)
    assert (run_dir / "hf_model").exists()  # cleared by the run's global rank 0 once it is built (train.py)


def test_strategies_that_start_processes_per_call_are_refused():
    for strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook"):
        with pytest.raises(UserError, match=f"trainer.strategy={strategy} is not supported: use trainer.strategy=ddp"):
            check(strategy, multirun=False, run_dir_given=True)
    check("ddp", multirun=False, run_dir_given=True)


def test_processes_started_together(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    monkeypatch.chdir(tmp_path)
    # Each process would name its own timestamped run folder.
    line = last_error(run_train_here(None, *SMOKE))
    assert line.startswith("error: under torchrun or srun all processes need one run folder"), line
    # Each would train the tokenizer and write it into the run folder at once. (A folder named by
    # output_dir, as by hydra.run.dir, passes the check above.)
    line = last_error(run_train_here(None, *SMOKE, f"output_dir={tmp_path / 'run'}", "tokenizer.train=true"))
    assert line.startswith("error: under torchrun or srun, train the tokenizer first"), line
