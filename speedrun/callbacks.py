"""Hydra callbacks: a sweep owns its folder, stops as a whole, and reports how it ended.

- At the start the sweep takes its folder (one live sweep per folder) and refuses a folder that holds
  another sweep's jobs, so two sweeps never mix (the same command again resumes the same sweep).
- Ctrl-C or SIGTERM stops the whole sweep: the running job ends `interrupted` (speedrun.train) and
  `SWEEP.stopped` makes every later job return at once, without starting.
- At the end it lists the jobs that did not complete and those not run, prints the command that
  resumes the sweep and the compare command, and exits 1 if any job did not complete.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from speedrun.run_folder import RunFolder, RunFolderBusy
from speedrun.summary import read_summary

SWEEP_RECORD = "sweep.json"
# Hydra settings that place a sweep: its resume command sets them itself.
PLACEMENT = ("hydra.sweep.dir", "hydra.mode")


@dataclass
class SweepState:
    """Shared by the callback and the jobs (which run in this process with Hydra's basic launcher)."""

    stopped: str | None = None  # why the sweep stopped early, if it did
    not_run: list[Path] = field(default_factory=list)
    # The sweep folder's lock, held from start to end. Here, not on the callback: launchers that run
    # jobs elsewhere (submitit) pickle the callbacks, and a held lock cannot be pickled.
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


SWEEP = SweepState()


def natural_key(text: str) -> list:
    """Sort "2_lr=…" before "10_lr=…", as Hydra numbers its jobs."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _definition(config: DictConfig) -> list[str]:
    """What makes this sweep this sweep: its task overrides (the last value of a key given twice, as Hydra
    applies them), minus those a resumed run may change (the horizon, cadence, logging:
    speedrun.checkpoint.RESUMABLE_CHANGES) and Hydra's own (where and how the sweep runs). Each job
    still checks its own config against its checkpoint when it resumes."""
    from speedrun.checkpoint import resumable_change

    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in config.hydra.overrides.task}
    return sorted(o for key, o in by_key.items() if not resumable_change(key))


class SweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SWEEP.stopped = None
        SWEEP.not_run.clear()
        folder = RunFolder(config.hydra.sweep.dir)
        try:
            SWEEP.held.enter_context(folder.lock("sweep"))
        except RunFolderBusy as exc:
            self._fail(str(exc))
        record = folder.path / SWEEP_RECORD
        definition = _definition(config)
        if record.is_file():
            earlier = json.loads(record.read_text()).get("overrides")
            if earlier != definition:
                SWEEP.held.close()
                self._fail(
                    f"sweep folder {folder.path} holds another sweep ({shlex.join(earlier or [])}); "
                    "use a new hydra.sweep.dir, or the same command to resume that sweep"
                )
        else:
            record.write_text(json.dumps({"overrides": definition}, indent=2) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._report(config)
        finally:
            SWEEP.held.close()

    def _report(self, config: DictConfig) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        not_run = {path.resolve() for path in SWEEP.not_run}
        for path in not_run:  # Hydra made their folders; a job that never started leaves none
            with contextlib.suppress(OSError):
                path.rmdir()
        jobs = sorted(
            (
                p
                for p in sweep_dir.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.resolve() not in not_run
            ),
            key=lambda path: natural_key(path.name),  # Hydra's job order: 2_... before 10_...
        )
        failed = []
        for job in jobs:
            summary = read_summary(job) or {"status": "missing", "error": "no summary.json"}
            if summary.get("status") != "completed":
                failed.append(f"  {job.name}: {summary.get('status')} {summary.get('error') or ''}".rstrip())
        total = len(jobs) + len(not_run)
        print(f"sweep {sweep_dir}: {len(jobs) - len(failed)}/{total} jobs completed")
        if failed:
            print("did not complete (details in each job's train.log):\n" + "\n".join(failed))
        if not_run:
            names = sorted((p.name for p in not_run), key=natural_key)
            print(f"not run ({SWEEP.stopped}): " + ", ".join(names))
        if failed or not_run:
            print(f"resume the sweep: {resume_sweep_command(config)}")
        print(f"compare them: python -m speedrun.compare {sweep_dir}")
        if failed or not_run:
            raise SystemExit(1)

    @staticmethod
    def _fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)


def resume_sweep_command(config: DictConfig) -> str:
    """The sweep's own command line, pinned to its folder: completed jobs are skipped, stopped ones resume."""
    hydra_overrides = [o for o in config.hydra.overrides.hydra if not o.startswith(PLACEMENT)]
    args = [
        *config.hydra.overrides.task,
        *hydra_overrides,
        f"hydra.sweep.dir={Path(config.hydra.sweep.dir).resolve()}",
    ]
    return shlex.join(["python", "-m", "speedrun.train", "-m", *args])
