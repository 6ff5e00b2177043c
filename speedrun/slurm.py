"""SLURM (and submitit's local executor): inside a job, each task is one rank and SLURM's signals stop a
run cleanly; outside, jobs are followed with `squeue`, which needs no accounting and never waits forever.

`adopt_submitit_task` runs as every job starts (speedrun.train.run_job). `wait_for_jobs` is what the
`hydra/launcher=slurm` launcher (hydra_plugins/speedrun_launchers/slurm.py) waits with.
"""

from __future__ import annotations

import getpass
import logging
import os
import signal
import subprocess
import time

log = logging.getLogger("speedrun")

# ------------------------------------------------------------------------------ inside a job's task


def adopt_submitit_task() -> None:
    """Make each task of a submitit job (`hydra/launcher=slurm`, or the plugin's `submitit_local`)
    one rank of the job, and take SLURM's signals over from submitit.

    hydra-submitit-launcher runs the whole Hydra job in every task (one per GPU); submitit derives
    the torch.distributed variables from the executor's (for SLURM: RANK = SLURM_PROCID, master = the
    first node), after which a task is an external rank exactly like one that torchrun started.
    Without this, every task would train the whole job on its own, all of them in one run folder.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return
    _take_over_signals()
    if "RANK" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _take_over_signals() -> None:
    """Every signal SLURM sends before a time limit or on pre-emption means "stop cleanly".

    submitit's own handlers suit a job that is one function call, not a training loop: it ignores
    SIGTERM, and on its pre-emption signal (USR2, which SLURM also sends `signal_delay_s` before the
    time limit) it pickles the call and requeues the job, or, once out of requeues, raises
    UncompletedJobError wherever the main thread is at that moment (inside backward(), say), so the
    run failed without a checkpoint. Here SIGTERM outside the training loop (start-up, export) is an
    interrupt, as in `speedrun.train.main`, and USR2 goes to whatever handles SIGTERM at that moment:
    the training loop's handler, which finishes the step, checkpoints and stops with `interrupted`.
    """
    from submitit import JobEnvironment

    from speedrun.signals import stop_also_on

    stop_also_on(getattr(signal, f"SIG{JobEnvironment.USR_SIG}"))


# ------------------------------------------------------------------------------ following jobs from outside

# SLURM job states after which a job never runs again (squeue's long names). Anything else (PENDING,
# RUNNING, COMPLETING, REQUEUED, SUSPENDED, ...) may still produce a result.
FINAL_STATES = frozenset(
    ["COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
     "OUT_OF_MEMORY"]
)  # fmt: skip
# A job squeue stops listing (slurmctld forgets finished jobs after MinJobAge) is over once this many
# polls in a row missed it: one miss can be a job that sbatch accepted a moment ago.
MISSES_BEFORE_LOST = 3
# How long the launcher keeps trying when squeue itself fails (slurmctld restarting, network).
SQUEUE_OUTAGE_LIMIT_S = 600.0


def squeue(user: str) -> dict[str, tuple[str, int, str]] | None:
    """Every job of `user` that slurmctld still knows: {job id: (state, restarts, reason)}, array
    tasks one by one (`12_3`); None if squeue failed. squeue works without accounting, unlike sacct,
    and lists finished jobs for MinJobAge seconds (300 by default)."""
    command = ["squeue", "--noheader", "--array", "--states=all", f"--user={user}",
               "--Format=JobArrayID:|,State:|,RestartCnt:|,Reason:"]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    jobs = {}
    for line in proc.stdout.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) == 4 and fields[2].isdigit():
            jobs[fields[0]] = (fields[1], int(fields[2]), fields[3])
    return jobs


def wait_for_jobs(job_ids: list[str], poll_s: float = 1.0, max_poll_s: float = 30.0) -> dict[str, str | None]:
    """Wait until SLURM says each job is over; return each job's final state (None: no longer listed;
    UNKNOWN: squeue kept failing).

    Polls squeue, at first every `poll_s` and then less often (up to `max_poll_s`), so that long jobs
    do not load the controller. A job is over when its state is final, or when squeue has stopped
    listing it. A requeued job (its restart count grew) is followed to its new end, and logged.
    """
    user = getpass.getuser()
    waiting = set(job_ids)
    ends: dict[str, str | None] = {}
    restarts = dict.fromkeys(job_ids, 0)
    misses = dict.fromkeys(job_ids, 0)
    held_reported: set[str] = set()
    started = time.monotonic()
    outage_since: float | None = None
    while waiting:
        jobs = squeue(user)
        if jobs is None:
            outage_since = outage_since or time.monotonic()
            if time.monotonic() - outage_since > SQUEUE_OUTAGE_LIMIT_S:
                log.error("error: squeue has failed for %.0f s; giving up on SLURM jobs %s",
                          SQUEUE_OUTAGE_LIMIT_S, " ".join(sorted(waiting)))  # fmt: skip
                ends.update(dict.fromkeys(waiting, "UNKNOWN"))
                break
        else:
            outage_since = None
            for job_id in sorted(waiting):
                if job_id not in jobs:
                    misses[job_id] += 1
                    if misses[job_id] >= MISSES_BEFORE_LOST:
                        ends[job_id] = None
                    continue
                misses[job_id] = 0
                state, restart_count, reason = jobs[job_id]
                if restart_count > restarts[job_id]:
                    restarts[job_id] = restart_count
                    log.info("SLURM requeued job %s (restart %d): it resumes from its newest checkpoint",
                             job_id, restart_count)  # fmt: skip
                if "held" in reason.lower() and job_id not in held_reported:
                    held_reported.add(job_id)
                    log.warning("SLURM job %s is held (%s): `scontrol release %s` or `scancel %s`",
                                job_id, reason, job_id, job_id)  # fmt: skip
                if state in FINAL_STATES:
                    ends[job_id] = state
            waiting -= ends.keys()
        if waiting:
            time.sleep(min(max_poll_s, poll_s + (time.monotonic() - started) / 60))  # +1 s per minute
    return ends
