"""`hydra/launcher=parallel`: a sweep's jobs run several at once on one machine, each on its own devices,
with the folders, failures and report of the sequential sweep."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, cli_env, read_summary

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the `parallel` extra is not installed")

# 4 jobs: two train for a few steps, two fail at once (96 does not divide the 128-token micro-batch).
SWEEP = [*TINY, "optimizer=adamw", "trainer.max_steps=3", "trainer.val_every=0", "trainer.export=false",
         "data.seq_len=64,96", "seed=1,2"]  # fmt: skip


def run_sweep(sweep: Path, *launcher: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "speedrun.train", "-m", *SWEEP, *launcher, f"hydra.sweep.dir={sweep}"]
    return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def report(proc: subprocess.CompletedProcess, sweep: Path) -> list[str]:
    """The end-of-sweep report (the lines from the `sweep ...: n/m jobs completed` line on), but the
    command that resumes the sweep, which names its own launcher."""
    lines = proc.stdout.replace(str(sweep), "SWEEP").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"sweep SWEEP: \d+/\d+ jobs completed", line))
    return [line for line in lines[start:] if not line.startswith("resume the sweep: ")]


def running_interval(job: Path) -> tuple[float, float]:
    """When a job ran: Hydra writes .hydra/ as it starts the job, rank 0 writes summary.json last."""
    return (job / ".hydra" / "config.yaml").stat().st_mtime, (job / "summary.json").stat().st_mtime


@pytest.mark.timeout(400)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two jobs on disjoint CPUs need two cores")
def test_two_jobs_at_once_on_their_own_cpus_report_as_the_sequential_sweep(
    corpus: Path, tmp_path: Path
) -> None:
    parallel = run_sweep(tmp_path / "parallel", "hydra/launcher=parallel", "hydra.launcher.jobs_at_once=2")
    sequential = run_sweep(tmp_path / "sequential")

    assert parallel.returncode == sequential.returncode == 1, (
        parallel.stdout[-3000:] + parallel.stderr[-3000:]
    )
    assert report(parallel, tmp_path / "parallel") == report(sequential, tmp_path / "sequential")
    assert "2/4 jobs completed" in parallel.stdout
    jobs = job_dirs(tmp_path / "parallel")
    assert [job.name for job in jobs] == [job.name for job in job_dirs(tmp_path / "sequential")]
    # The same numbers as one job after another: each job is the same computation, only elsewhere.
    for job, alone in zip(jobs, job_dirs(tmp_path / "sequential"), strict=True):
        ours, theirs = read_summary(job), read_summary(alone)
        assert (ours["status"], ours["val_bpb"], ours["error"]) == (
            theirs["status"],
            theirs["val_bpb"],
            theirs["error"],
        )

    # Jobs 0 and 1 (the two that train) ran at the same time, on different CPUs.
    (start0, end0), (start1, end1) = running_interval(jobs[0]), running_interval(jobs[1])
    assert start0 < end1 and start1 < end0, "the two jobs did not overlap in time"
    devices = [re.search(r"devices: CPUs ([\d,]+)", (job / "train.log").read_text())[1] for job in jobs[:2]]
    assert devices[0] != devices[1] and len(set(devices)) == 2, devices


def test_each_job_slot_gets_its_own_gpus_and_they_must_fit(monkeypatch) -> None:
    """The split of the visible GPUs into job slots. There is no GPU here, so the list of visible
    devices is given (on a GPU machine it comes from CUDA_VISIBLE_DEVICES and torch)."""
    from hydra_plugins.speedrun_launchers import parallel

    monkeypatch.setattr(parallel, "visible_gpus", lambda: ["0", "1", "2", "3", "4", "5", "6", "7"])
    assert parallel.split_devices(4, 2) == [
        {"gpus": "0,1"},
        {"gpus": "2,3"},
        {"gpus": "4,5"},
        {"gpus": "6,7"},
    ]
    assert parallel.split_devices(3, 1) == [{"gpus": "0"}, {"gpus": "1"}, {"gpus": "2"}]
    with pytest.raises(ValueError, match=r"jobs_at_once=5 x gpus_per_job=2 needs 10 GPUs, 8 are visible"):
        parallel.split_devices(5, 2)


def test_a_bad_setting_is_one_error_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "speedrun.train", "-m", "hydra/launcher=parallel", "hydra.launcher.jobs_at_once=0",
               "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: hydra.launcher.jobs_at_once=0 and hydra.launcher.gpus_per_job=1 must both be at least 1"
    )
