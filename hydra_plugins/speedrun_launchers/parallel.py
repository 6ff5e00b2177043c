"""`hydra/launcher=parallel`: a sweep on one machine, up to `jobs_at_once` jobs at a time, each on devices
of its own: `gpus_per_job` GPUs (a disjoint CUDA_VISIBLE_DEVICES set), or on a CPU-only machine an
equal share of the cores (a disjoint CPU affinity).

The scheduling is hydra-joblib-launcher's (joblib's process pool, `pip install -e '.[parallel]'`): it
was chosen over submitit's local executor because that one starts every job of a sweep at once and
hands each the same first GPUs. What this adds is the device split. A pool worker runs one job at a
time and keeps its processes across jobs, and CUDA reads CUDA_VISIBLE_DEVICES only once per process,
so each worker claims one device set for its whole life (a file lock in the sweep folder, released
when the worker exits) and sets it before its first job starts CUDA.

Jobs run as in the sequential sweep (speedrun.train.run_job catches a job's failure, records it in its
summary.json, and the sweep goes on), in the same folders, with the same end-of-sweep report. A worker
that dies outright (killed, out of memory) ends the whole sweep, as it would the sequential one.

Hydra loads launchers only from the `hydra_plugins` package, hence this file's place. Hydra imports
it at every start, so joblib and torch are imported only when a sweep is launched.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

log = logging.getLogger("speedrun")

# The device set this process claimed (its index, and the open lock file that holds the claim).
_claim: tuple[int, Any] | None = None


class ParallelLauncher(Launcher):
    def __init__(self, jobs_at_once: int = 2, gpus_per_job: int = 1) -> None:
        self.jobs_at_once = jobs_at_once
        self.gpus_per_job = gpus_per_job
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

        assert self.config is not None
        try:
            device_sets = split_devices(self.jobs_at_once, self.gpus_per_job)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        lock_dir = Path(str(self.config.hydra.sweep.dir)) / ".devices"
        lock_dir.mkdir(parents=True, exist_ok=True)
        pool = JoblibLauncher(n_jobs=self.jobs_at_once)
        pool.setup(hydra_context=self.hydra_context, config=self.config,
                   task_function=OnOwnDevices(self.task_function, device_sets, lock_dir))  # fmt: skip
        return list(pool.launch(job_overrides, initial_job_idx))


def split_devices(jobs_at_once: int, gpus_per_job: int) -> list[dict]:
    """One device set per job slot: {"gpus": "0,1"} on a GPU machine, else {"cpus": [0, 1]}."""
    if jobs_at_once < 1 or gpus_per_job < 1:
        raise ValueError(
            f"hydra.launcher.jobs_at_once={jobs_at_once} and hydra.launcher.gpus_per_job={gpus_per_job} "
            "must both be at least 1"
        )
    gpus = visible_gpus()
    if gpus:
        if jobs_at_once * gpus_per_job > len(gpus):
            raise ValueError(
                f"hydra.launcher.jobs_at_once={jobs_at_once} x gpus_per_job={gpus_per_job} needs "
                f"{jobs_at_once * gpus_per_job} GPUs, {len(gpus)} are visible; lower one of them"
            )
        return [
            {"gpus": ",".join(gpus[i * gpus_per_job : (i + 1) * gpus_per_job])} for i in range(jobs_at_once)
        ]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < jobs_at_once:  # more jobs than cores: they share, one core each
        log.warning("%d jobs at once on %d CPU cores: jobs share cores", jobs_at_once, len(cpus))
        return [{"cpus": [cpus[i % len(cpus)]]} for i in range(jobs_at_once)]
    share = len(cpus) // jobs_at_once
    return [{"cpus": cpus[i * share : (i + 1) * share]} for i in range(jobs_at_once)]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


class OnOwnDevices:
    """The task function, run on the device set this pool worker claimed."""

    def __init__(self, task_function: Any, device_sets: list[dict], lock_dir: Path) -> None:
        self.task_function = task_function
        self.device_sets = device_sets
        self.lock_dir = lock_dir

    def __call__(self, cfg: DictConfig) -> Any:
        devices = self.device_sets[claim_device_set(self.lock_dir, len(self.device_sets))]
        if "gpus" in devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices["gpus"]
            log.info("devices: CUDA_VISIBLE_DEVICES=%s", devices["gpus"])
        else:
            os.sched_setaffinity(0, devices["cpus"])
            log.info("devices: CPUs %s", ",".join(map(str, devices["cpus"])))
        return self.task_function(cfg)


def claim_device_set(lock_dir: Path, count: int) -> int:
    """The index of the device set this process holds, claimed on first use: the first of `count`
    lock files no other live process holds (a worker that exits releases its claim)."""
    global _claim
    if _claim is None:
        while _claim is None:
            for index in range(count):
                handle = open(lock_dir / f"set-{index}.lock", "w")  # noqa: SIM115 - held for life
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                _claim = (index, handle)
                break
            else:  # a worker that is exiting still holds its set for a moment
                time.sleep(0.1)
    return _claim[0]
