"""Distributed jobs with real processes (gloo on CPU), launched as users launch them.

N ranks must compute what 1 rank computes, a rank that raises must fail the whole job fast, and
SIGTERM must stop every rank, both with `trainer.nproc_per_node=2` (our elastic launcher inside
the Hydra process) and under an external `torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from speedrun.data.shards import HEADER_BYTES
from speedrun.signals import signals_held
from tests.conftest import REPO, TINY, cli_env, read_metrics, read_summary

STEPS = 12
# AdamW keeps every step in float32. Muon orthogonalizes in bfloat16, where a last-bit difference
# in a gradient can flip a rounding and the runs drift apart by ~1e-4 within 12 steps, which would
# hide real mistakes behind a loose tolerance; its rank sharing is checked exactly in test_optim.
FAST = [*TINY, "optimizer=adamw", f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.val_every=0"]
FAST += ["trainer.export=false"]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
TRAIN = [sys.executable, "-m", "speedrun.train"]


# ---------------------------------------------------------------------------------------- helpers


def run(cmd: list[str], *, cwd: Path = REPO, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def job_command(launcher: str, run_dir: Path, *overrides: str) -> list[str]:
    if launcher == "torchrun":
        return [*TORCHRUN, "-m", "speedrun.train", *overrides, f"hydra.run.dir={run_dir}"]
    return [*TRAIN, *overrides, "trainer.nproc_per_node=2", f"hydra.run.dir={run_dir}"]


def train_losses(run_dir: Path) -> tuple[list[int], np.ndarray]:
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    return [r["step"] for r in records], np.array([r["train/loss"] for r in records])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(newest, weights_only=True)["model"]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """Same losses at every step and the same final weights as the 1-rank run.

    Only the order of float32 sums differs: gloo adds the two ranks' gradients, where one rank
    accumulates all 8 micro-batches itself. That moves results by ~1e-7 relative per step, which
    12 AdamW steps compound to ~1e-6 (measured: losses 1e-7, weights 9e-7). A real mistake is
    orders of magnitude larger: logging rank 0's share of the loss instead of the global batch's
    is off by 1e-3 at step 1, and a rank reading another rank's tokens changes every loss.
    """
    steps, losses = train_losses(run_dir)
    ref_steps, ref_losses = train_losses(reference)
    assert steps == ref_steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0)
    weights, ref_weights = final_weights(run_dir), final_weights(reference)
    assert weights.keys() == ref_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=0, atol=1e-5, msg=name)


def process_tree(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of `root` and every descendant, from /proc (the start time tells a reused
    pid apart). torchrun starts its workers in sessions of their own, so follow parent pids."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    tree, todo = set(), [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            tree.add(child)
            todo.append(child[0])
    return tree


def still_running(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    alive = set()
    for pid, started in processes:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == started and fields[0] != "Z":  # a zombie has exited and awaits its reaper
            alive.add((pid, started))
    return alive


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and '"train/loss"' in metrics.read_text():
            return
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before training"
        time.sleep(0.2)
    raise AssertionError(f"no training step logged in {timeout} s")


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-rank job every multi-rank job must reproduce: accumulation 8 of 128-token micro-batches."""
    run_dir = tmp_path_factory.mktemp("one_rank") / "run"
    succeeded(run([*TRAIN, *FAST, "trainer.nproc_per_node=1", f"hydra.run.dir={run_dir}"]))
    assert "world_size:1 grad_accum_steps:8 micro_batch_tokens:128" in (run_dir / "train.log").read_text()
    return run_dir


@pytest.fixture(scope="module")
def corrupt_data(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The corpus with one token id beyond the vocabulary, where only rank 1 reads it, at step 3.

    A real fault that hits one rank: the stream gives each micro-step a chunk of (128 + 1) x 2
    tokens, rank 1 taking the second half; the embedding lookup of rank 1 alone then raises.
    """
    folder = tmp_path_factory.mktemp("corrupt")
    for name in ("stdlib_train_000000.bin", "stdlib_val_000000.bin", "stdlib_1024_bpe.model"):
        shutil.copy(corpus / name, folder / name)
    span, grad_accum, step = 128 + 1, 4, 3
    chunk = (step - 1) * grad_accum  # the first micro-step of step 3
    position = chunk * 2 * span + span + 10  # inside rank 1's half of that chunk
    tokens = np.memmap(folder / "stdlib_train_000000.bin", dtype=np.uint16, mode="r+", offset=HEADER_BYTES)
    tokens[position] = np.iinfo(np.uint16).max
    tokens.flush()
    # Past the check that refuses such ids before any rank starts (see tests/unchecked_data.py).
    return ["data=shards", f"data.path={folder}", f"data.tokenizer={folder / 'stdlib_1024_bpe.model'}",
            "data._target_=tests.unchecked_data.UncheckedShardDataset"]  # fmt: skip


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(300)
def test_two_ranks_compute_what_one_rank_computes(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    succeeded(run(job_command("internal", run_dir, *FAST)))
    assert "world_size:2 grad_accum_steps:4 micro_batch_tokens:128" in (run_dir / "train.log").read_text()
    assert read_summary(run_dir)["world_size"] == 2
    assert_same_training(run_dir, reference)
    # One code_bytes, however the job is launched (the source a job runs, not what a process imported).
    assert read_summary(run_dir)["code_bytes"] == read_summary(reference)["code_bytes"] > 0


@pytest.mark.timeout(300)
def test_torchrun_ranks_share_one_default_run_folder(reference: Path, tmp_path: Path) -> None:
    """No hydra.run.dir: every rank must land in outputs/<date>/torchrun-<id> (relative to the
    working directory), one folder that rank 0 alone writes."""
    proc = succeeded(run([*TORCHRUN, "-m", "speedrun.train", *FAST], cwd=tmp_path))
    folders = list((tmp_path / "outputs").glob("*/*"))
    assert len(folders) == 1 and folders[0].name.startswith("torchrun-"), folders
    run_dir = folders[0]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob(".hydra")] == [
        run_dir.relative_to(tmp_path) / ".hydra"
    ]
    log = (run_dir / "train.log").read_text()
    assert log.count(f"step {STEPS}/{STEPS} ") == 1 and proc.stdout.count(f"step {STEPS}/{STEPS} ") == 1
    assert "world_size:2 grad_accum_steps:4 micro_batch_tokens:128" in log
    assert read_summary(run_dir)["status"] == "completed"
    assert_same_training(run_dir, reference)
    assert read_summary(run_dir)["code_bytes"] == read_summary(reference)["code_bytes"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["internal", "torchrun"])
def test_a_rank_that_raises_fails_the_job(launcher: str, corrupt_data: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run(job_command(launcher, run_dir, *FAST, *corrupt_data), timeout=150)
    assert proc.returncode != 0
    log = (run_dir / "train.log").read_text()
    assert "[rank 1] Traceback" in log and "IndexError: index out of range" in log
    assert "step 2/12" in log and "step 3/12" not in log
    summary = read_summary(run_dir)
    assert summary["status"] == "failed"
    # Rank 0 only saw its all-reduce break; the summary names the rank that raised, and why.
    assert summary["error"].startswith("rank 1 failed: IndexError: index out of range"), summary["error"]


def test_a_signal_during_a_failure_report_waits_for_the_report() -> None:
    """The moment one rank dies, torchrun sends SIGTERM to the others; rank 0 must still finish
    naming the culprit in summary.json before that SIGTERM (a KeyboardInterrupt) takes effect."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    reported = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # an unheld signal's handler would run here, before the report
                reported.append("summary.json")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert reported == ["summary.json"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["internal", "torchrun"])
def test_sigterm_stops_every_rank(launcher: str, corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*FAST, "trainer.max_steps=100000"]
    if launcher == "internal":
        # Also the micro-batch knob: 2 ranks x 256 tokens on a 1024-token batch = accumulation 2.
        overrides.append("trainer.micro_batch_tokens=256")
    with open(tmp_path / "output.txt", "w") as output:
        proc = subprocess.Popen(
            job_command(launcher, run_dir, *overrides), cwd=REPO, env=cli_env(), stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for_training(run_dir, proc)
            processes = process_tree(proc.pid)
            assert len(processes) >= 2, "expected the two ranks among the job's processes"
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=60)
            # Seconds, not the launcher's 30 s grace period before a SIGKILL.
            assert time.monotonic() - sent < 20, (tmp_path / "output.txt").read_text()[-3000:]
            deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits on its own
            while still_running(processes) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not still_running(processes)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert returncode != 0
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted", summary
    assert list((run_dir / "checkpoints").glob("step_*.pt")), "rank 0 checkpoints when stopped"
    log = (run_dir / "train.log").read_text()
    if launcher == "internal":
        assert "world_size:2 grad_accum_steps:2 micro_batch_tokens:256" in log
    # The one command that resumes it, with the same launcher shape.
    resume = next(line for line in log.splitlines() if line.startswith("resume with: "))
    launcher_words = (
        ["torchrun", "--standalone", "--nproc_per_node", "2"] if launcher == "torchrun" else ["python"]
    )
    assert resume.split()[2 : 2 + len(launcher_words)] == launcher_words, resume
    assert resume.endswith(f"hydra.run.dir={run_dir}"), resume


@pytest.mark.timeout(60)
def test_a_micro_batch_that_does_not_divide_the_batch_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run(job_command("internal", run_dir, *FAST, "trainer.micro_batch_tokens=384"))
    # Refused with the world size it names, before any folder is made.
    assert proc.returncode != 0 and not run_dir.exists()
    assert proc.stderr.startswith("error: ") and "trainer.micro_batch_tokens=384" in proc.stderr


@pytest.mark.timeout(300)
def test_submitit_tasks_are_the_ranks_of_one_job(reference: Path, corpus: Path, tmp_path: Path) -> None:
    """hydra-submitit-launcher runs the whole job in every task. With the plugin's local executor
    (what `hydra/launcher=slurm` does on a cluster, on this machine) two tasks must be the two ranks
    of one job, in one folder, computing what one rank computes: not two copies of the job. Run from
    an empty folder, so that every task must also agree on the default `multirun_outputs/<date>_<time>`."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `slurm` extra is not installed")
    proc = succeeded(
        run([*TRAIN, "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *FAST,
             f"data.cache_dir={corpus}"], cwd=tmp_path)
    )  # fmt: skip
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    (run_dir,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    log = (run_dir / "train.log").read_text()
    assert log.count(f"step {STEPS}/{STEPS} ") == 1, log[-2000:]
    assert "world_size:2 grad_accum_steps:4 micro_batch_tokens:128" in log
    assert read_summary(run_dir)["status"] == "completed"
    assert "1/1 jobs completed" in proc.stdout
    assert_same_training(run_dir, reference)


def test_slurm_preset_runs_one_task_per_gpu() -> None:
    """`hydra/launcher=slurm` extends the hydra-submitit-launcher plugin's config: it composes only
    where the optional `slurm` extra is installed, so without it this test skips."""
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher.config", reason="the `slurm` extra is not installed"
    )
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from speedrun.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"]
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node) == (2, 4)
