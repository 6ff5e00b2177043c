"""`hydra/launcher=slurm` against a real single-node SLURM cluster (tests/slurm_cluster.py).

Each test submits real jobs with `python -m speedrun.train -m hydra/launcher=slurm`, as a user does,
and checks what SLURM did to them from the run folders: a 2-task job is one job of world size 2, a
sweep is a job array, a signal (scancel, the time limit's warning, a requeue) ends a run
`interrupted` with a checkpoint at the stop, and running the same command again (or SLURM's requeue)
resumes it to exactly the uninterrupted result. Jobs train a tiny GPT in float32 (AdamW) on one
thread per rank, so those results are equal bit for bit. The cluster has no accounting, as many
small clusters, so the launcher must follow its jobs with squeue alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from speedrun.sinks.wandb_reader import find_offline_runs, read_offline_run
from tests.conftest import REPO, TINY, cli_env, read_metrics, read_summary
from tests.slurm_cluster import TIME_LIMIT_CHECK_S, ClusterUnavailable, SlurmCluster

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `slurm` extra is not installed")

STEPS = 40  # the horizon of the pre-empted jobs: long enough to stop one mid-way
# float32 throughout (AdamW), one micro-batch of 512 tokens per rank and step, no periodic evaluation.
JOB = [*TINY, "optimizer=adamw", "trainer.micro_batch_tokens=512", "trainer.log_every=1",
       "trainer.val_every=0", "trainer.export=false"]  # fmt: skip
# The `slurm` preset on a CPU node: one task of one CPU per job unless a test asks for more.
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=1",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5"]  # fmt: skip
TRAIN = [sys.executable, "-m", "speedrun.train"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, corpus: Path):
    try:
        running = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except ClusterUnavailable as error:
        pytest.skip(f"no SLURM test cluster: {error}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus: Path) -> Path:
    """The uninterrupted run that every pre-empted and resumed job must reproduce, trained locally."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    succeeded(subprocess.run([*TRAIN, *JOB, f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}"],
                             cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120))  # fmt: skip
    return run_dir


# ---------------------------------------------------------------------------------------- helpers


def sweep_command(sweep: Path, *overrides: str) -> list[str]:
    return [*TRAIN, *SLURM, *JOB, *overrides, f"hydra.sweep.dir={sweep}"]


def submit(cluster: SlurmCluster, command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=cli_env(SLURM_CONF=str(cluster.conf)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(
            f"the launcher did not return within {timeout:.0f} s:\n{output[-4000:]}"
        ) from None
    return proc.returncode, output


def run_sweep(cluster: SlurmCluster, command: list[str], cwd: Path, timeout: float = 120) -> str:
    returncode, output = finished(submit(cluster, command, cwd), timeout)
    assert returncode == 0, f"exit {returncode}\n{output[-4000:]}"
    return output


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def slurm_job_ids(sweep: Path) -> list[str]:
    """The SLURM job ids of a sweep's jobs (submitit names a folder after each)."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit())


def wait_for_training(sweep: Path, min_step: int, timeout: float = 60) -> tuple[str, Path]:
    """(SLURM job id, run folder) of a sweep's only job, once it has logged `min_step` train steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = [*sweep.glob("0_*/metrics.jsonl")]
        if metrics and (sweep / ".submitit").is_dir():
            lines = metrics[0].read_text().split("\n")[:-1]  # the last line may be half-written
            steps = [row["step"] for row in map(json.loads, lines) if "train/loss" in row]
            if steps and steps[-1] >= min_step:
                (job_id,) = slurm_job_ids(sweep)
                return job_id, metrics[0].parent
        time.sleep(0.05)
    raise AssertionError(f"no job of {sweep} reached step {min_step} within {timeout:.0f} s")


def scontrol(cluster: SlurmCluster, *arguments: str) -> None:
    subprocess.run(["scontrol", *arguments], env=cluster.env, check=True, capture_output=True, timeout=30)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(newest, weights_only=True)["model"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit for bit the reference run: every step's loss and the final weights."""

    def losses(path: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["train/loss"]) for r in read_metrics(path) if "train/loss" in r]

    assert losses(run_dir) == losses(reference)
    weights, expected = final_weights(run_dir), final_weights(reference)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def assert_interrupted_with_checkpoint(run_dir: Path, signal_name: str) -> int:
    """The run stopped at a step boundary, checkpointed that step, and says so; returns the step."""
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted", summary
    step = summary["steps"]
    assert step > 0 and summary["error"] == f"interrupted by {signal_name} at step {step}"
    assert (run_dir / "checkpoints" / f"step_{step:09d}.pt").is_file()
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, step + 1))
    return step


def assert_wandb_complete(run_dir: Path) -> None:
    """One offline wandb run, holding every row of metrics.jsonl and an exit record."""
    assert len(find_offline_runs(run_dir)) == 1
    run = read_offline_run(run_dir)
    assert [row["step"] for row in run["history"]] == [r["step"] for r in read_metrics(run_dir)]
    assert run["exit_code"] is not None


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.timeout(120)
def test_a_two_task_job_is_one_job_of_world_size_two(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Two tasks are the two ranks of one job, computing exactly what a local 2-rank run computes."""
    steps = ["trainer.max_steps=12"]
    local = tmp_path / "local"
    local_run = subprocess.Popen([*TRAIN, *JOB, *steps, "trainer.nproc_per_node=2", f"hydra.run.dir={local}"],
                                 cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sweep = tmp_path / "sweep"
    output = run_sweep(cluster, sweep_command(sweep, *steps, "hydra.launcher.tasks_per_node=2"), tmp_path)
    assert finished(local_run, 120)[0] == 0
    (run_dir,) = job_dirs(sweep)
    summary = read_summary(run_dir)
    assert (summary["status"], summary["world_size"]) == ("completed", 2)
    log = (run_dir / "train.log").read_text()
    assert log.count("step 12/12 ") == 1 and "world_size:2 grad_accum_steps:1 micro_batch_tokens:512" in log
    assert "1/1 jobs completed" in output and "sacct" not in output
    assert_same_run(run_dir, local)


@pytest.mark.timeout(120)
def test_a_sweep_runs_as_a_job_array(cluster: SlurmCluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    output = run_sweep(cluster, sweep_command(sweep, "trainer.max_steps=5", "seed=1,2"), tmp_path)
    jobs = job_dirs(sweep)
    assert [read_summary(job)["seed"] for job in jobs] == [1, 2]
    assert all(read_summary(job)["status"] == "completed" for job in jobs)
    array = re.fullmatch(r"(\d+)_0", slurm_job_ids(sweep)[1])
    assert array and slurm_job_ids(sweep) == [array[1], f"{array[1]}_0", f"{array[1]}_1"], "one job array"
    assert "2/2 jobs completed" in output


@pytest.mark.timeout(150)
def test_scancel_term_stops_cleanly_and_the_same_command_resumes(
    cluster: SlurmCluster, reference: Path, tmp_path: Path
) -> None:
    """`scancel --signal=TERM` reaches every process of the job, wandb's service included: the run
    checkpoints at the stop, its offline wandb run is complete, and the same command resumes it."""
    sweep = tmp_path / "sweep"
    command = sweep_command(sweep, f"trainer.max_steps={STEPS}", "logger=wandb")
    launcher = submit(cluster, command, tmp_path)
    job_id, run_dir = wait_for_training(sweep, min_step=3)
    subprocess.run(["scancel", "--signal=TERM", job_id], env=cluster.env, check=True)
    returncode, output = finished(launcher, 60)
    assert returncode == 1 and "0/1 jobs completed" in output, output[-3000:]
    assert_interrupted_with_checkpoint(run_dir, "SIGTERM")
    assert_wandb_complete(run_dir)

    run_sweep(cluster, command, tmp_path)
    assert read_summary(run_dir)["status"] == "completed"
    assert_same_run(run_dir, reference)


def next_time_limit_check(cluster: SlurmCluster) -> float:
    """When (time.time()) the controller next checks time limits: 30 s after its last check, which its
    log records at debug2 ("Testing job time limits")."""
    stamps = re.findall(r"^\[([\d\-T:.]+)\] debug2: Testing job time limits",
                        cluster.path("log/slurmctld.log").read_text(), re.MULTILINE)  # fmt: skip
    last = datetime.fromisoformat(stamps[-1]).timestamp() if stamps else cluster.started_at
    return last + TIME_LIMIT_CHECK_S


@pytest.mark.timeout(180)
def test_a_time_limit_stops_cleanly_and_the_run_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    """The preset's time-limit warning (USR2, `signal_delay_s` before the limit) stops the run like
    SIGTERM does, instead of submitit failing it mid-step.

    SLURM sends the warning at one of its time-limit checks, every 30 s. So that the job is a few
    steps in when it comes, the test holds the job (scontrol suspend) as soon as it trains, gives it a
    1-minute limit (the 120-s warning is then due) and lets it go on just before the next check. The
    step it stops at depends on this machine's speed: the run has no step limit and a constant
    learning rate, and is resumed to a horizon just past that step (in the same folder), which an
    uninterrupted run to the same horizon must equal."""
    sweep = tmp_path / "sweep"
    job = [
        "schedule.warmdown_ratio=0",
        "hydra.launcher.signal_delay_s=120",
        "logger=wandb",
        "hydra.sweep.subdir=0_job",
    ]
    launcher = submit(cluster, sweep_command(sweep, "trainer.max_steps=1000000", *job), tmp_path)
    job_id, run_dir = wait_for_training(sweep, min_step=3)
    scontrol(cluster, "suspend", job_id)
    scontrol(cluster, "update", f"JobId={job_id}", "TimeLimit=1")
    check = next_time_limit_check(cluster)
    while check - time.time() < 2:  # too close to catch: the one after
        check += TIME_LIMIT_CHECK_S
    time.sleep(check - time.time() - 1.5)
    scontrol(cluster, "resume", job_id)
    returncode, output = finished(launcher, 60)
    assert returncode == 1, output[-3000:]
    stopped = assert_interrupted_with_checkpoint(run_dir, "SIGUSR2")
    assert_wandb_complete(run_dir)

    horizon = [f"trainer.max_steps={stopped + 5}", "schedule.warmdown_ratio=0"]
    reference = tmp_path / "reference"
    uninterrupted = subprocess.Popen([*TRAIN, *JOB, *horizon, f"hydra.run.dir={reference}"], cwd=REPO,
                                     env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    run_sweep(cluster, sweep_command(sweep, *horizon, *job), tmp_path)
    assert finished(uninterrupted, 120)[0] == 0
    assert read_summary(run_dir)["status"] == "completed"
    assert_same_run(run_dir, reference)


@pytest.mark.timeout(150)
def test_a_requeued_job_resumes_and_the_launcher_waits_for_it(
    cluster: SlurmCluster, reference: Path, tmp_path: Path
) -> None:
    """`scontrol requeue` stops the job (SIGTERM) and starts it again: it resumes from its checkpoint,
    and the launcher reports the requeued job's real end, not the first attempt's `interrupted`."""
    sweep = tmp_path / "sweep"
    launcher = submit(cluster, sweep_command(sweep, f"trainer.max_steps={STEPS}"), tmp_path)
    job_id, run_dir = wait_for_training(sweep, min_step=3)
    scontrol(cluster, "requeue", job_id)
    returncode, output = finished(launcher, 120)
    assert returncode == 0 and "1/1 jobs completed" in output, output[-3000:]
    assert f"SLURM requeued job {job_id} (restart 1)" in output
    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"interrupted at step (\d+) by SIGTERM", log)
    assert stopped and f"at step {stopped.group(1)} (" in log.split("resumed from", 1)[1].splitlines()[0]
    assert_same_run(run_dir, reference)


@pytest.mark.timeout(120)
def test_a_job_cancelled_while_pending_fails_the_sweep_instead_of_hanging(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """One array task at a time, so the second job waits; cancelled there, it never writes a result.
    The launcher must end the sweep with that job failed (in its summary.json and the report)."""
    sweep = tmp_path / "sweep"
    command = sweep_command(sweep, "trainer.max_steps=5", "seed=1,2", "hydra.launcher.array_parallelism=1")
    launcher = submit(cluster, command, tmp_path)
    deadline = time.monotonic() + 60
    pending = None
    while pending is None and time.monotonic() < deadline:
        jobs = subprocess.run(["squeue", "--noheader", "--array", "--states=PENDING", "--format=%i"],
                              env=cluster.env, capture_output=True, text=True).stdout.split()  # fmt: skip
        pending = next((job for job in jobs if job.endswith("_1")), None)
        time.sleep(0.1)
    assert pending, "the second array task never showed as pending"
    subprocess.run(["scancel", pending], env=cluster.env, check=True)
    returncode, output = finished(launcher, 90)
    assert returncode == 1 and "1/2 jobs completed" in output, output[-3000:]
    first, second = job_dirs(sweep)
    assert read_summary(first)["status"] == "completed"
    summary = read_summary(second)
    # Whether squeue still shows the task as CANCELLED when the launcher polls, or has already forgotten
    # it, is a race inside SLURM; either way the job is failed and the reason names it.
    ended = rf"SLURM job {re.escape(pending)} (left the queue \(cancelled before it started|ended CANCELLED)"
    assert summary["status"] == "failed" and re.match(ended, summary["error"]), summary["error"]
    assert re.search(rf"{re.escape(second.name)}: failed {ended}", output), output[-3000:]


@pytest.mark.timeout(60)
def test_a_sweep_sbatch_refuses_is_one_error_line(cluster: SlurmCluster, tmp_path: Path) -> None:
    returncode, output = finished(
        submit(cluster, sweep_command(tmp_path / "sweep", "hydra.launcher.partition=nowhere"), tmp_path), 60
    )
    assert returncode == 1 and "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: sbatch refused the sweep: ") and "invalid partition" in last.lower(), (
        output
    )
