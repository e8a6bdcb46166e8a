"""A stop of a sweep whose jobs run side by side (hydra/launcher=parallel) lets every running
job save first. joblib's worker pool (loky) ends all its workers, unsaved, when the sweep's
own process is stopped, when a job's stop reaches it as an error, or when a worker dies (an
idle one killed by Ctrl-C). So:
- the workers ignore Ctrl-C and SIGTERM while they run no job (a job installs its own
  handlers: interrupt.stop_signals);
- each job holds a lock file, named by its process, until it has saved and ended;
- on Ctrl-C or SIGTERM the sweep's process passes SIGTERM on to the workers that hold one,
  waits for their locks, and only then ends, taking the pool down with it; a job that a
  worker takes up meanwhile (queued before the stop) ends before it starts;
- a job that ends its process's work (stopped on its own, a SLURM requeue) first stops the
  sweep that way;
- a worker whose sweep process was killed (kill -9) stops its job the same way and ends:
  loky's workers would otherwise train on unsupervised, then linger;
- a worker killed outright (kill -9, out of memory: its job is lost since its last save)
  stops the sweep that way too, before loky kills the other workers (_stop_first)."""

import fcntl
import functools
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tqdm import tqdm

from bert_mlm.errors import UserError
from bert_mlm.exits import finish_sweep_line

JOBLIB = ("1.5", "1.6")  # the joblib releases it works with (1.5 added backend initializers): pyproject.toml
_terminate_broken = None  # in the sweep's process: loky's own reply to a dead worker (_stop_first)
_sweep: tuple[int, Path] | None = None  # in a worker: the sweep's process and the folder of job locks
_in_job = False  # in a worker: whether it runs a job now
STOPPING = "stopping"  # in the folder of job locks: the sweep is stopping, start no job
_locks: Path | None = None  # in the sweep's process: that folder
_stopping = False
_handlers: tuple = ()  # the sweep process's own, put back at its end
_worker_died: str | None = None  # in the sweep's process: why it stops, if a worker died


def _joblib() -> tuple:
    """joblib (the `parallel` extra), imported only as a sweep side by side starts or ends, so
    that an install without it still trains; of the releases whose insides this reaches into."""
    import joblib
    if ".".join(joblib.__version__.split(".")[:2]) not in JOBLIB:
        raise UserError(f"hydra/launcher=parallel needs joblib {' or '.join(JOBLIB)}, not {joblib.__version__}: "
                        'pip install -e ".[parallel]"')
    from joblib import register_parallel_backend
    from joblib._parallel_backends import LokyBackend  # the only way in: see stop_jobs_together
    from joblib.externals.loky.process_executor import _ExecutorManagerThread  # and to a dead worker's: _stop_first
    return register_parallel_backend, LokyBackend, _ExecutorManagerThread


def _in_worker(sweep_pid: int, locks: str) -> None:
    """loky's initializer, in each worker process as it starts."""
    global _sweep
    _sweep = sweep_pid, Path(locks)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore: one whose worker joblib ends at a stop
    # is never released, and Python's resource tracker warns about it as the sweep ends.
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_end_with_the_sweep, args=(sweep_pid,), daemon=True).start()


def _end_with_the_sweep(sweep_pid: int) -> None:
    while os.getppid() == sweep_pid:  # a killed parent's children are adopted: init's, or a subreaper's
        time.sleep(1)
    if _in_job:  # the job saves; job_lock then ends the process
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    else:
        os._exit(0)


def stop_jobs_together(sweep_dir: str) -> None:
    """In the sweep's process, before its workers start (a Hydra callback's on_multirun_start)."""
    global _locks, _handlers, _stopping, _worker_died, _terminate_broken
    register_parallel_backend, LokyBackend, _ExecutorManagerThread = _joblib()
    _stopping, _worker_died = False, None
    _locks = Path(sweep_dir) / ".jobs"  # beside .gpus/; left by a sweep killed outright, cleared here
    shutil.rmtree(_locks, ignore_errors=True)
    _locks.mkdir(parents=True)
    # Hydra's joblib launcher asks for "loky" by name (which joblib.parallel_config cannot
    # reach): the same backend under that name, with our initializer, in this process only.
    register_parallel_backend("loky", functools.partial(LokyBackend, initializer=_in_worker,
                                                        initargs=(os.getpid(), str(_locks))))

    def on_stop(signum, frame):
        global _stopping
        if _stopping:  # a job passing its stop back, or a second SIGTERM
            return
        _stopping = True
        signal.signal(signal.SIGINT, at_once)
        (_locks / STOPPING).touch()
        running = []
        for path in _locks.glob("*.lock"):
            lock = path.open("a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock.close()  # no job runs there (ended, or its worker is gone)
            except BlockingIOError:
                running.append(lock)
                with suppress(ProcessLookupError):
                    os.kill(int(path.stem), signal.SIGTERM)
        for lock in running:
            fcntl.flock(lock, fcntl.LOCK_EX)  # that job has saved and ended
            lock.close()
        shutil.rmtree(_locks, ignore_errors=True)  # the handlers stay: a job's late word must not end this process
        if _worker_died:
            print(f"error: {_worker_died}: the other running jobs stopped and saved last.ckpt; "
                  f"{finish_sweep_line(sweep_dir)}", file=sys.stderr)
            sys.exit(1)
        by = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"sweep stopped by {by}, once its running jobs had stopped (saving last.ckpt if they had "
              f"trained); {finish_sweep_line(sweep_dir)}", file=sys.stderr)
        sys.exit(128 + signum)  # joblib ends its workers (all idle now) as this passes

    def at_once(signum, frame):  # a second Ctrl-C: the jobs it reached end unsaved (their own second)
        print(f"\nsweep ended at once by a second Ctrl-C, not waiting for its running jobs to save; "
              f"{finish_sweep_line(sweep_dir)}", file=sys.stderr)
        sys.exit(128 + signum)  # joblib kills its workers as this passes

    _handlers = signal.signal(signal.SIGINT, on_stop), signal.signal(signal.SIGTERM, on_stop)
    _terminate_broken = _ExecutorManagerThread.terminate_broken
    _ExecutorManagerThread.terminate_broken = _stop_first


def _stop_first(manager, error: BaseException) -> None:
    """loky's reply to a worker that died (in its own thread): the other workers killed at once.
    Instead the sweep stops first, as on SIGTERM (on_stop, in the main thread), and this waits
    until the running jobs have saved and ended."""
    global _worker_died
    if not _stopping and _locks:
        _worker_died = "a worker process of the sweep died (killed outright: out of memory?), ending its job unsaved"
        os.kill(os.getpid(), signal.SIGTERM)
        for path in _locks.glob("*.lock"):
            with suppress(OSError), path.open("a") as lock:  # (OSError: the sweep's end took the folder)
                fcntl.flock(lock, fcntl.LOCK_EX)
    _terminate_broken(manager, error)


def end() -> None:
    """In the sweep's process, at its end: joblib, the signal handlers and no lock folder, as before."""
    global _locks, _handlers
    if _locks:
        register_parallel_backend, LokyBackend, _ExecutorManagerThread = _joblib()
        register_parallel_backend("loky", LokyBackend)
        _ExecutorManagerThread.terminate_broken = _terminate_broken
        signal.signal(signal.SIGINT, _handlers[0])
        signal.signal(signal.SIGTERM, _handlers[1])
        shutil.rmtree(_locks, ignore_errors=True)
        _locks, _handlers = None, ()


@contextmanager
def job_lock() -> Iterator[None]:
    """Around a job (main) in a worker of a sweep side by side: its lock, held until it ends."""
    if _sweep is None:  # not in such a worker
        yield
        return
    global _in_job
    sweep_pid, locks = _sweep
    if (locks / STOPPING).exists():
        sys.exit(128 + signal.SIGTERM)
    lock = (locks / f"{os.getpid()}.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    _in_job = True
    try:
        yield
    except BaseException as end:
        # A stop, a requeue (not an error, which Hydra reports as the job's): loky would end
        # every worker as this reaches it. The sweep stops the others first, as a sweep of one
        # job at a time stops, waiting for this one too (its lock is still held).
        if not isinstance(end, Exception):
            with suppress(ProcessLookupError):
                os.kill(sweep_pid, signal.SIGTERM)
        raise
    finally:
        _in_job = False
        if os.getppid() != sweep_pid:  # the sweep's process was killed: this worker ends too
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)
        lock.close()
