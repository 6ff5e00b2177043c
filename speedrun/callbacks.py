"""Hydra callbacks: the end-of-sweep report that makes a sweep with failed jobs exit non-zero."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from speedrun.compare import natural_key
from speedrun.summary import read_summary

log = logging.getLogger("speedrun")


class SweepReport(Callback):
    """After the last job: list jobs that did not complete, and exit 1 if there are any.

    Each job's own failure was caught and recorded in its summary.json so that the sweep went on;
    this is where the sweep as a whole owns up to it.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted(
            (p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda path: natural_key(path.name),  # Hydra's job order: 2_... before 10_...
        )
        failed = []
        for job in jobs:
            summary = read_summary(job) or {"status": "missing", "error": "no summary.json"}
            if summary.get("status") != "completed":
                failed.append(f"  {job.name}: {summary.get('status')} {summary.get('error') or ''}".rstrip())
        print(f"sweep {sweep_dir}: {len(jobs) - len(failed)}/{len(jobs)} jobs completed")
        print(f"compare them: python -m speedrun.compare {sweep_dir}")
        if failed:
            print("failed jobs (details in each job's train.log):\n" + "\n".join(failed))
            raise SystemExit(1)
