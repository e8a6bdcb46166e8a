"""At the end of a sweep (`python -m train -m ...`), summary.csv in the sweep folder:
one row per job with its overrides and final val metrics, best val/loss first; the same
table is printed."""

import csv
import json
import math
import os
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bert_mlm.errors import refuse
from bert_mlm.module import VAL_METRICS
from bert_mlm.run_folder import RECORD, output_dir_given


def run_folder(job: Path) -> Path:
    """Where a job trained: its own folder, or the one a swept output_dir=a,b named."""
    record = OmegaConf.load(job / RECORD / "config.yaml")
    return Path(record.output_dir) if output_dir_given(record) else job


def summarize(sweep_dir: Path, since: float = 0.0) -> list[dict]:
    """Writes summary.csv and returns its rows: the jobs started `since` (a time.time()),
    not those an earlier sweep into the same folder left: a job of this sweep wrote its record,
    or made its folder or a new record beside the earlier one there (preflight.py)."""
    def new(path: Path) -> bool:
        return path.stat().st_mtime >= since

    rows = []
    started = [p for p in sweep_dir.iterdir() if (p / RECORD / "overrides.yaml").is_file()
               and (new(p) or new(p / RECORD / "overrides.yaml"))]
    for job in sorted(started, key=lambda p: (len(p.name), p.name)):  # 2 before 10
        metrics_file = run_folder(job) / "metrics.json"
        # One from before this sweep is an earlier run's: this job (a refused resume) failed.
        done = metrics_file.is_file() and new(metrics_file)
        metrics = json.loads(metrics_file.read_text()) if done else {}
        after = metrics.get("after", {})
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(OmegaConf.load(job / RECORD / "overrides.yaml")),
                **{name: after.get(name, "") for name in VAL_METRICS},
                "steps": metrics.get("steps", ""),
                "tokens_per_sec": metrics.get("train/tokens_per_sec", ""),
                "status": "done" if metrics else "failed",
            }
        )
    rows.sort(key=lambda r: r["val/loss"] if r["val/loss"] != "" else math.inf)
    path = sweep_dir / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "overrides", *VAL_METRICS, "steps", "tokens_per_sec", "status"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as aligned text for the console, overrides last (they vary in length)."""
    def number(value, spec: str) -> str:  # "" for a failed job, None for a run too short to time
        return "" if value in ("", None) else format(value, spec)

    cells = [("job", "val/loss", "val/ppl", "val/acc", "steps", "tokens/s")]
    cells += [(r["job"], number(r["val/loss"], ".4f"), number(r["val/ppl"], ".4g"), number(r["val/acc"], ".4f"),
               str(r["steps"]), number(r["tokens_per_sec"], ",.0f")) for r in rows]
    overrides = ["overrides"] + [r["overrides"] + ("" if r["status"] == "done" else "  (failed)")
                                 for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) + "  " + o for row, o in zip(cells, overrides))


class SweepSummary(Callback):
    """A Hydra callback (hydra.callbacks in conf/hydra/default.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # The time by the sweep folder's file system (a file made and deleted there), which
        # stamps the jobs' files: its clock may not be this machine's (NFS).
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=sweep_dir) as stamp:
            self.started = os.fstat(stamp.fileno()).st_mtime

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = summarize(sweep_dir, self.started)
            jobs = f"{len(rows)} job" + "s" * (len(rows) != 1)
            print(f"\nsweep of {jobs}, best val/loss first ({sweep_dir / 'summary.csv'}):\n{table(rows)}")
            failed = sum(r["status"] == "failed" for r in rows)
            if failed:
                refuse(f"{failed} of {jobs} failed: their error lines are above, their logs in their folders", code=1)
