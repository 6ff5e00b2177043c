"""`hydra/launcher=slurm`: hydra-submitit-launcher's submission, followed with squeue instead of sacct.

The plugin's own launcher waits on submitit, which asks `sacct` for job states. Without SLURM
accounting (common on small clusters) every poll fails with a warning, and a job that never wrote a
result, such as one cancelled while pending, is waited for forever. It also takes a job's result as
soon as the result file exists, although a job that SLURM requeues runs again and writes another.

This launcher submits exactly as the plugin does (the plugin's launcher is what runs inside each
task), then waits with `speedrun.slurm.wait_for_jobs`, which follows SLURM's own view of each job
through requeues to its real end. A job that ends without a result is recorded as failed in its
folder's summary.json, so the sweep report lists it like any other failed job.

Hydra loads launchers only from the `hydra_plugins` package, hence this file's place. Hydra imports
it at every start, so the optional plugin and submitit are imported only when a sweep is launched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("speedrun")


class SlurmLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        # As the plugin does: every value resolved now, in the Hydra process.
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}  # fmt: skip
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurm

        from speedrun.slurm import wait_for_jobs

        assert self.config is not None
        # What runs in each task: the plugin's launcher, which runs the Hydra job there.
        task = SubmititSlurm(**self.params)
        task.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])  # fmt: skip
        executor.update_parameters(**self._job_parameters())
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("SLURM sweep output dir: %s", sweep_dir)
        arguments = []
        for offset, overrides in enumerate(job_overrides):
            number = initial_job_idx + offset
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
            # The task's arguments, as the plugin passes them: the job's overrides, the key of its folder,
            # its number, a placeholder id (the task reads its real one from SLURM), Hydra's singletons.
            arguments.append(
                (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
            )
        try:
            jobs = executor.map_array(task, *zip(*arguments, strict=True))
        except submitit.core.utils.FailedJobError as error:  # sbatch refused them (its message is above)
            lines = str(error).strip().splitlines() or ["no message"]
            raise SystemExit(
                f"error: sbatch refused the sweep: {lines[-1]}; check hydra.launcher.*"
            ) from None
        log.info("SLURM jobs: %s", " ".join(job.job_id for job in jobs))
        final_states = wait_for_jobs([job.job_id for job in jobs])
        return [
            self._job_return(job, list(overrides), initial_job_idx + offset, final_states[job.job_id])
            for offset, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True))
        ]

    def _job_parameters(self) -> dict:
        """The plugin's rule: keys every executor shares keep their name, SLURM's get a `slurm_` prefix."""
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        return {
            key if key in shared else f"slurm_{key}": value
            for key, value in self.params.items()
            if key not in ("submitit_folder", "max_num_timeout")
        }

    def _job_return(self, job: Any, overrides: list[str], number: int, state: str | None) -> JobReturn:
        """Task 0's result (the job's own JobReturn), or a failed job's when there is none."""
        task0 = job.task(0)
        if task0.paths.result_pickle.exists():
            try:
                return task0.result()
            except Exception as error:  # noqa: BLE001 - the task raised outside the training job
                lines = [line for line in str(error).splitlines() if line.strip()]
                reason = f"SLURM job {job.job_id} raised {lines[-1] if lines else type(error).__name__}"
        else:
            # squeue forgets an array task cancelled before it started, as it does a lost job.
            ended = f"ended {state}" if state else "left the queue (cancelled before it started, or lost)"
            reason = f"SLURM job {job.job_id} {ended} without a result"
        return self._failed_job(overrides, number, job.job_id, f"{reason}; its log: {task0.paths.stderr}")

    def _failed_job(self, overrides: list[str], number: int, job_id: str, reason: str) -> JobReturn:
        """A job that never reported: its folder gets a summary.json saying so (the sweep report and
        `speedrun.compare` read those), and the sweeper gets +inf, as for any job that did not complete."""
        from speedrun.summary import read_summary, write_summary

        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = number
            config.hydra.job.id = job_id
        run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        summary = read_summary(run_dir) or {}
        if summary.get("status") in (None, "running"):  # a job killed mid-run keeps what it measured
            write_summary(run_dir, {**summary, "status": "failed", "error": reason, "seed": config.get("seed"),
                                    "overrides": overrides})  # fmt: skip
        log.error("error: %s", reason)
        result = JobReturn(
            overrides=overrides, cfg=config, working_dir=str(run_dir), status=JobStatus.COMPLETED
        )
        result.return_value = math.inf
        return result
