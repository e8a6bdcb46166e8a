"""At the end of a sweep (`python -m train -m ...`), summary.csv in the sweep folder:
one row per job with its overrides and final val metrics, best val/loss first."""

import csv
import json
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

METRICS = ("val/loss", "val/ppl", "val/acc")


def summarize(sweep_dir: Path) -> Path:
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        after = metrics.get("after", {})
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(OmegaConf.load(job / ".hydra" / "overrides.yaml")),
                **{name: after.get(name, "") for name in METRICS},
                "steps": metrics.get("steps", ""),
                "tokens_per_sec": metrics.get("train/tokens_per_sec", ""),
                "status": "done" if metrics else "failed",
            }
        )
    rows.sort(key=lambda r: r["val/loss"] if r["val/loss"] != "" else math.inf)
    path = sweep_dir / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "overrides", *METRICS, "steps", "tokens_per_sec", "status"])
        writer.writeheader()
        writer.writerows(rows)
    return path


class SweepSummary(Callback):
    """A Hydra callback (hydra.callbacks in conf/hydra/default.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(f"sweep summary: {summarize(sweep_dir)}")
