"""Hydra callbacks: the end-of-sweep report that makes a sweep with failed jobs exit non-zero."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from speedrun.summary import read_summary

log = logging.getLogger("speedrun")


class SweepReport(Callback):
    """After the last job: list jobs that did not complete, and exit 1 if there are any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        failed = []
        for job in jobs:
            summary = read_summary(job) or {"status": "missing", "error": "no summary.json"}
            if summary.get("status") != "completed":
                failed.append(f"  {job.name}: {summary.get('status')} {summary.get('error') or ''}".rstrip())
        print(f"sweep {sweep_dir}: {len(jobs) - len(failed)}/{len(jobs)} jobs completed")
        if failed:
            print("failed jobs:\n" + "\n".join(failed))
            raise SystemExit(1)
