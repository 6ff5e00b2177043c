"""Fault injection through the real CLI: kill -9 then resume, signals, corrupt, hostile and failing
checkpoints, divergence, wandb down, bad data. Every run is a real `python -m speedrun.train`.

The runs that share a starting point (the uninterrupted reference run) share it through a
module fixture, and each fault test works on its own copy of that run folder.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from speedrun.checkpoint import load_checkpoint
from speedrun.data.shards import HEADER_BYTES, load_shard, write_shard
from speedrun.sinks.wandb_reader import read_offline_runs
from tests.conftest import REPO, TINY, cli_env, read_metrics, read_summary, run_train
from tests.test_sinks import strict_json

pytestmark = pytest.mark.usefixtures("corpus")

# Two micro-batches per step instead of the reference's eight: the same code paths, a quarter of the time.
FAST = ("trainer.micro_batch_tokens=512",)
# A step-based run (exactness needs a schedule that does not read the clock: no wallclock horizon),
# checkpointed every 8 steps, validated at 0, 12 and 24, logging every step.
EXACT = (
    *FAST,
    "trainer.max_steps=24",
    "trainer.max_wallclock_seconds=0",
    "trainer.checkpoint_every=8",
    "trainer.val_every=12",
    "trainer.log_every=1",
)
# Record fields that measure time and so differ between two runs computing the same numbers.
TIMING = {"train_time_ms", "train/tok_per_sec", "step_ms", "train/mfu", "val/time_ms", "quant/time_ms"}
SUMMARY_NUMBERS = ("val_loss", "val_bpb", "min_val_bpb", "quant_val_loss", "quant_val_bpb", "model_bytes",
                   "steps", "tokens_seen", "params")  # fmt: skip


# ---------------------------------------------------------------------------------------- helpers


def start_train(run_dir: Path, *overrides: str, **popen_kwargs) -> subprocess.Popen:
    """The same command as run_train, started in its own process group (so it can be killed whole)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "speedrun.train", *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as out:  # a file, not a pipe nobody drains
        return subprocess.Popen(
            cmd, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            **popen_kwargs,
        )  # fmt: skip


def output_of(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text()


def wait_until(condition, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited (rc {proc.returncode}) before the condition held"
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def trained_steps(run_dir: Path) -> list[int]:
    """Steps of the train records on disk so far (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return steps


def checkpoint_names(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_tensors(a, b, where: str = "") -> None:
    """Equal nested state: every tensor bit for bit (torch.equal), everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_reproduces(run_dir: Path, reference: Path) -> None:
    """run_dir ended exactly as the uninterrupted reference run: losses, final metrics, weights."""
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(reference))
    ours, theirs = read_summary(run_dir), read_summary(reference)
    assert ours["status"] == "completed"
    assert {k: ours[k] for k in SUMMARY_NUMBERS} == {k: theirs[k] for k in SUMMARY_NUMBERS}
    final = "checkpoints/step_000000024.pt"
    a, b = load_checkpoint(run_dir / final), load_checkpoint(reference / final)
    for part in ("model", "optimizer", "loader", "rng", "step", "records_logged"):
        assert_same_tensors(a[part], b[part], part)
    assert (run_dir / "final_model.int8.ptz").read_bytes() == (
        reference / "final_model.int8.ptz"
    ).read_bytes()


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]


def without_wandb_access(home: Path) -> dict:
    """An environment where wandb online cannot start: no API key, no netrc, no server."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_BASE_URL="http://127.0.0.1:9", WANDB_SILENT="true")
    return env


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted run every fault test must reproduce or fall back on, and its output.

    It also asks for wandb online where wandb cannot start: that must cost one warning, nothing else
    (the fault tests resume copies of it with logger=none, a change resuming allows)."""
    root = tmp_path_factory.mktemp("reference")
    run_dir = root / "run"
    proc = run_train(run_dir, *EXACT, "logger=wandb", "logger.mode=online", env=without_wandb_access(root))
    return run_dir, (proc.stdout + proc.stderr).replace(str(root), "<tmp>")


@pytest.fixture
def reference(reference_run) -> Path:
    return reference_run[0]


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


# ------------------------------------------------------------------------------ checkpoint format


@pytest.mark.timeout(180)
def test_checkpoint_holds_the_whole_state_and_only_the_newest_are_kept(reference):
    # checkpoint_every=8 wrote steps 8, 16 and 24 (24 also the end one, written once); keep_checkpoints=2.
    assert checkpoint_names(reference) == ["step_000000016.pt", "step_000000024.pt"]
    log = (reference / "train.log").read_text()
    assert [line.rsplit("/", 1)[1] for line in log.splitlines() if line.startswith("checkpoint:")] == [
        "step_000000008.pt", "step_000000016.pt", "step_000000024.pt",
    ]  # fmt: skip

    state = torch.load(reference / "checkpoints/step_000000024.pt", weights_only=True)
    assert state["step"] == 24 and state["train_time_ms"] > 0
    assert {"embed", "matrix", "scalar"} <= state["optimizer"].keys()
    assert state["model"].keys() and all(isinstance(t, torch.Tensor) for t in state["model"].values())
    # The data stream's position: 24 steps x 2 micro-batches x (512 + 1) tokens (one target token more).
    assert state["loader"] == {"shard": 0, "offset": 24 * 2 * 513}
    assert {"python", "numpy", "torch"} <= state["rng"].keys()
    assert state["config"]["data"]["seq_len"] == 64 and state["config"]["trainer"]["max_steps"] == 24
    # Everything metrics.jsonl held at the end checkpoint: all records but the final validation's and export's.
    assert state["records_logged"] == len(read_metrics(reference)) - 2
    # The artifact too is plain data: zlib around a torch.save that loads with weights_only=True.
    artifact = torch.load(io.BytesIO(zlib.decompress((reference / "final_model.int8.ptz").read_bytes())),
                          weights_only=True)  # fmt: skip
    assert artifact["__quant_format__"]


# ------------------------------------------------------------------------------------ exactness


@pytest.mark.timeout(180)
def test_kill_9_then_the_same_command_reproduces_the_run_bit_for_bit(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *EXACT)
    # Past the step-8 checkpoint, so records written after it must be dropped on resume.
    wait_until(lambda: any(s >= 10 for s in trained_steps(run_dir)), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    newest = checkpoint_names(run_dir)[-1]
    assert newest in ("step_000000008.pt", "step_000000016.pt")

    resumed = run_train(run_dir, *EXACT)
    assert f"resumed from {run_dir / 'checkpoints' / newest} at step {int(newest[5:14])}" in resumed.stdout
    assert_reproduces(run_dir, reference)


@pytest.mark.timeout(180)
def test_a_truncated_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    newest = run_dir / "checkpoints/step_000000024.pt"
    os.truncate(newest, newest.stat().st_size // 2)  # as a crash mid-copy or a full disk leaves it

    proc = run_train(run_dir, *EXACT)
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_000000024.pt is truncated" in warnings[0], proc.stdout
    assert f"resumed from {run_dir / 'checkpoints/step_000000016.pt'} at step 16" in proc.stdout
    assert (run_dir / "checkpoints/step_000000024.pt.corrupt").exists()
    assert_reproduces(run_dir, reference)


@pytest.mark.timeout(120)
def test_resume_from_another_run_folder_given_by_path(reference, tmp_path):
    # A folder path means its newest valid checkpoint; here the end one, so only the final
    # validation and the export run again, and they reproduce the reference's numbers.
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *EXACT, f"trainer.resume={reference}")
    assert f"resumed from {reference / 'checkpoints/step_000000024.pt'} at step 24" in proc.stdout
    ours, theirs = read_summary(run_dir), read_summary(reference)
    assert {k: ours[k] for k in SUMMARY_NUMBERS} == {k: theirs[k] for k in SUMMARY_NUMBERS}
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(reference)[-2:])


# ------------------------------------------------------------------------------------- signals


@pytest.mark.timeout(180)
def test_sigterm_checkpoints_and_stops_and_the_resumed_run_counts_the_time_used(tmp_path):
    run_dir = tmp_path / "run"
    # A 3-second training budget, checkpointed every half second of wall time.
    args = (*FAST, "trainer.max_steps=0", "trainer.max_wallclock_seconds=3", "trainer.checkpoint_every_seconds=0.5",
            "trainer.val_every=0", "trainer.log_every=1", "trainer.export=false")  # fmt: skip
    proc = start_train(run_dir, *args)
    log = run_dir / "train.log"
    wait_until(lambda: log.exists() and log.read_text().count("checkpoint:") >= 2, proc)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM pre-emption does: the whole job
    proc.wait(timeout=30)
    assert time.monotonic() - signalled < 10
    assert proc.returncode != 0, output_of(run_dir)

    summary = read_summary(run_dir)
    stopped = summary["steps"]
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert checkpoint_names(run_dir)[-1] == f"step_{stopped:09d}.pt"
    assert f"interrupted at step {stopped} by SIGTERM" in log.read_text()
    used_ms = load_checkpoint(run_dir / f"checkpoints/step_{stopped:09d}.pt")["train_time_ms"]
    assert 0 < used_ms < 3000

    run_train(run_dir, *args)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] > stopped
    # The budget is 3 s in all, not 3 s more: the resumed run went on from the time already used.
    assert 3000 <= summary["train_time_ms"] < 3000 + 5 * summary["step_avg_ms"] + 500
    after = [r for r in read_metrics(run_dir) if r["step"] > stopped]
    assert after and after[0]["train_time_ms"] > used_ms


@pytest.mark.timeout(120)
def test_sigint_finishes_the_step_checkpoints_and_exits_non_zero(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(
        run_dir, *FAST, "trainer.max_steps=10000", "trainer.val_every=0", "trainer.log_every=1"
    )
    wait_until(lambda: len(trained_steps(run_dir)) >= 2, proc)
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=30)
    assert time.monotonic() - signalled < 10
    assert proc.returncode != 0
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and "SIGINT" in summary["error"]
    assert checkpoint_names(run_dir) == [f"step_{summary['steps']:09d}.pt"]
    assert not (run_dir / "final_model.int8.ptz").exists()


# ---------------------------------------------------------------------------- failing writes


def _limit_file_size() -> None:
    # Files may grow to 512 KiB: logs, metrics and the tiny artifact fit, a 1.3 MB checkpoint does not,
    # so its write fails with EFBIG as on a full disk or quota (Python ignores SIGXFSZ, so it is an OSError).
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))


@pytest.mark.timeout(180)
def test_a_failing_checkpoint_write_warns_keeps_the_previous_one_and_training_goes_on(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    (run_dir / "checkpoints/step_000000024.pt").unlink()  # resume from 16; checkpoint every 4 from there

    proc = start_train(run_dir, *EXACT, "trainer.checkpoint_every=4", preexec_fn=_limit_file_size)
    assert proc.wait(timeout=150) == 0, output_of(run_dir)
    out = output_of(run_dir)
    failures = [line for line in out.splitlines() if "checkpoint at step" in line]
    assert len(failures) == 2 and all(line.startswith("warning:") for line in failures), out
    assert "step 20 failed (OSError" in failures[0] and "File too large" in failures[0]
    assert "step_000000016.pt is still the newest" in failures[1]
    # Training went on to the end, and the previous checkpoint is intact and resumable.
    assert read_summary(run_dir)["status"] == "completed" and read_summary(run_dir)["steps"] == 24
    assert checkpoint_names(run_dir) == ["step_000000016.pt"]  # no torn or temporary file left
    assert load_checkpoint(run_dir / "checkpoints/step_000000016.pt")["step"] == 16


# ----------------------------------------------------------------------------------- divergence


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "trigger",
    [("optimizer.matrix_lr=1e20", "optimizer.scalar_lr=1e20"), ("trainer.max_loss=0.5",)],
    ids=["nan-loss", "max-loss"],
)
def test_divergence_stops_at_once_without_artifact(tmp_path, trigger):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *FAST, "trainer.max_steps=30", "trainer.val_every=0", "trainer.log_every=1",
                     "trainer.checkpoint_every=1", *trigger, check=False)  # fmt: skip
    assert proc.returncode != 0

    # Both files are strict JSON (no NaN), whatever the losses were.
    for line in [
        *(run_dir / "metrics.jsonl").read_text().splitlines(),
        (run_dir / "summary.json").read_text(),
    ]:
        strict_json(line)
    summary = read_summary(run_dir)
    step = summary["diverged_step"]
    assert summary["status"] == "diverged" and summary["steps"] == step
    losses = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert max(losses) == step  # stopped at the step that diverged
    if trigger == ("trainer.max_loss=0.5",):
        assert step == 1 and summary["diverged_loss"] > 0.5 and summary["last_finite_loss"] is None
    else:
        # summary.json is strict JSON: the non-finite loss is null, and `nonfinite` says what it was.
        assert (
            step >= 2
            and summary["diverged_loss"] is None
            and summary["nonfinite"] == {"diverged_loss": "nan"}
        )
        assert summary["last_finite_step"] == step - 1
        assert summary["last_finite_loss"] == losses[step - 1]
    log_line = [
        line for line in (run_dir / "train.log").read_text().splitlines() if "diverged at step" in line
    ]
    assert log_line == [f"error: {summary['error']}"] and f"diverged at step {step}" in summary["error"]
    assert not (run_dir / "final_model.int8.ptz").exists()
    # Checkpoints stop before the diverged step: its weights may already be ruined.
    assert checkpoint_names(run_dir)[-1:] == ([f"step_{step - 1:09d}.pt"] if step > 1 else [])


# ---------------------------------------------------------------------------- refused resumes


@pytest.mark.timeout(120)
def test_resume_with_a_changed_config_is_refused_in_one_line_and_changes_nothing(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before = {
        p.name: p.read_bytes() for p in (run_dir, run_dir / "checkpoints") for p in p.iterdir() if p.is_file()
    }
    proc = run_train(run_dir, *EXACT, "data.seq_len=128", check=False)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert "data.seq_len: 64 -> 128" in errors[0] and "trainer.resume_force=true" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    after = {
        p.name: p.read_bytes() for p in (run_dir, run_dir / "checkpoints") for p in p.iterdir() if p.is_file()
    }
    # Nothing of the run's record is touched (not even train.log); the attempt has its own line.
    assert json.loads(after.pop("attempts.jsonl").splitlines()[-1])["status"] == "refused"
    before.pop("attempts.jsonl", None)
    assert after == before


@pytest.mark.timeout(120)
def test_resume_force_accepts_a_changed_config_and_says_so_once(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    proc = run_train(run_dir, *EXACT, "data.seq_len=128", "trainer.resume_force=true")
    output, log = proc.stdout + proc.stderr, (run_dir / "train.log").read_text()
    warning = "despite config changes (data.seq_len: 64 -> 128)"
    assert output.count(warning) == 1 and log.count(warning) == 1, output
    assert "resumed from" in log and read_summary(run_dir)["status"] == "completed"


@pytest.mark.timeout(120)
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    class Payload:
        """Unpickling this creates `marker`: what a hostile checkpoint would do, harmlessly."""

        def __init__(self, marker: Path):
            self.marker = marker

        def __reduce__(self):
            return (open, (str(self.marker), "w"))

    def craft(path: Path, marker: Path) -> None:
        torch.save(
            {"model": {"w": torch.zeros(2)}, "optimizer": Payload(marker), "step": 8, "config": {}}, path
        )

    # The payload is live: an unsafe load (weights_only=False) runs it.
    craft(tmp_path / "control.pt", tmp_path / "control_marker")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control_marker").exists()

    hostile, marker = tmp_path / "step_000000008.pt", tmp_path / "marker"
    craft(hostile, marker)
    proc = run_train(tmp_path / "run", "trainer.max_steps=2", f"trainer.resume={hostile}", check=False)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1 and str(hostile) in errors[0] and "could run code" in errors[0], errors
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------- wandb and data


@pytest.mark.timeout(180)
def test_wandb_failing_to_start_costs_one_warning_and_the_local_files_are_complete(reference_run):
    run_dir, output = reference_run
    # (The log header's `command:` line names logger=wandb: not a wandb message.)
    wandb_lines = [
        line for line in output.splitlines() if "wandb" in line.lower() and not line.startswith("command:")
    ]
    assert len(wandb_lines) == 1 and "wandb is off for this run" in wandb_lines[0], output
    assert "No API key configured" in wandb_lines[0] and "Traceback" not in output
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["quant_val_bpb"] is not None
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 25))
    assert "quant/val_bpb" in records[-1]


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory, stdlib_corpus_dir: Path) -> Path:
    """A small valid folder of shards made from the embedded corpus, and its tokenizer."""
    folder = tmp_path_factory.mktemp("shards")
    tokens = np.asarray(load_shard(sorted(stdlib_corpus_dir.glob("stdlib_train_*.bin"))[0])[:40_000])
    write_shard(folder / "mine_train_000000.bin", tokens[:30_000])
    write_shard(folder / "mine_val_000000.bin", tokens[30_000:])
    shutil.copy(next(stdlib_corpus_dir.glob("*.model")), folder / "tokenizer.model")
    return folder


def _empty_shard(folder: Path) -> Path:
    bad = folder / "mine_train_000001.bin"
    bad.touch()
    return bad


def _truncated_shard(folder: Path) -> Path:
    bad = folder / "mine_train_000001.bin"
    write_shard(bad, np.arange(5000, dtype=np.uint16))
    os.truncate(bad, HEADER_BYTES + 2 * 3000)
    return bad


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("missing", ("is not a folder", "speedrun.prepare")),
        ("empty", ("shorter than the", "delete it")),
        ("truncated", ("truncated", "delete it")),
    ],
)
def test_bad_data_is_one_clear_line_and_nothing_is_written(shard_folder, tmp_path, fault, expected):
    folder = tmp_path / "data"
    shutil.copytree(shard_folder, folder)
    culprit = {
        "missing": lambda: tmp_path / "nonexistent",
        "empty": lambda: _empty_shard(folder),
        "truncated": lambda: _truncated_shard(folder),
    }[fault]()
    path = culprit if fault == "missing" else folder
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "data=shards", f"data.path={path}", f"data.tokenizer={folder / 'tokenizer.model'}",
                     "trainer.max_steps=2", check=False)  # fmt: skip
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1 and str(culprit) in errors[0], proc.stdout + proc.stderr
    assert all(text in errors[0] for text in expected), errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final_model.int8.ptz").exists()
    assert read_summary(run_dir)["status"] == "failed" and str(culprit) in read_summary(run_dir)["error"]


# ------------------------------------------------------------------- one folder, one run (issue 10)


@pytest.mark.timeout(240)
def test_a_live_run_folder_is_refused_naming_its_process_and_kill_9_cannot_leave_it_stuck(tmp_path):
    run_dir = tmp_path / "run"
    args = (*FAST, "trainer.val_every=0", "trainer.checkpoint_every=2", "trainer.export=false")
    first = start_train(run_dir, *args, "trainer.max_steps=10000")
    wait_until(lambda: len(checkpoint_names(run_dir)) >= 1, first)
    hydra_record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    second = run_train(run_dir, *args, "trainer.max_steps=10000", check=False)
    errors = error_lines(second)
    assert second.returncode != 0 and len(errors) == 1, second.stdout + second.stderr
    assert f"run folder {run_dir} is in use by process {first.pid}" in errors[0]
    assert "Traceback" not in second.stdout + second.stderr and first.poll() is None
    # The refused attempt wrote nothing: not its record, not even its attempts line (the folder is a live
    # run's, which writes its own attempts line and summary when it ends).
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_record
    assert not (run_dir / "attempts.jsonl").exists() and not (run_dir / "summary.json").exists()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    newest = int(checkpoint_names(run_dir)[-1][5:14])
    third = run_train(run_dir, *args, f"trainer.max_steps={newest + 2}")
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{newest:09d}.pt'}" in third.stdout
    assert read_summary(run_dir)["status"] == "completed"


@pytest.mark.timeout(240)
def test_an_interrupted_run_prints_the_one_command_that_resumes_it_bit_for_bit(reference, tmp_path):
    """SIGTERM mid-run, then the printed command, from another folder: the run ends as if never stopped,
    and its offline wandb run continues under the same id, every record logged once."""
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *EXACT, "logger=wandb", "logger.mode=offline")
    wait_until(lambda: len(trained_steps(run_dir)) >= 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    printed = [line for line in output_of(run_dir).splitlines() if line.startswith("resume with: ")]
    assert len(printed) == 1 and printed[0] in (run_dir / "train.log").read_text()
    command = shlex.split(printed[0].removeprefix("resume with: "))
    assert command[:3] == ["python", "-m", "speedrun.train"] and command[-1] == f"hydra.run.dir={run_dir}"
    elsewhere = tmp_path / "elsewhere"  # the command works from any folder
    elsewhere.mkdir()
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=elsewhere, env=cli_env(), capture_output=True,
                             text=True, timeout=180)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_reproduces(run_dir, reference)
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["status"] for a in attempts] == ["interrupted", "completed"]
    first, second = read_offline_runs(run_dir)
    assert first["id"] == second["id"] and second["exit_code"] == 0
    rows = [(row["step"], tuple(sorted(k for k in row if not k.startswith("_")))) for row in
            first["history"] + second["history"]]  # fmt: skip
    assert len(rows) == len(set(rows)) == len(read_metrics(run_dir))  # each record once, none repeated
    stopped = int(attempts[0]["error"].rsplit(" ", 1)[-1])  # "interrupted by SIGTERM at step N"
    assert min(row["step"] for row in second["history"]) > stopped


@pytest.mark.timeout(240)
def test_a_stop_during_the_final_validation_ends_interrupted_with_the_end_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    # The whole validation split, in small batches: the final validation takes a few seconds.
    args = (
        *FAST,
        "trainer.max_steps=4",
        "trainer.val_every=0",
        "data.val_tokens=0",
        "trainer.val_batch_tokens=1024",
    )
    proc = start_train(run_dir, *args)
    log = run_dir / "train.log"
    wait_until(lambda: log.exists() and "step_000000004.pt" in log.read_text(), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    summary = read_summary(run_dir)
    assert proc.returncode != 0 and summary["status"] == "interrupted", output_of(run_dir)
    assert (
        checkpoint_names(run_dir) == ["step_000000004.pt"] and not (run_dir / "final_model.int8.ptz").exists()
    )
    run_train(run_dir, *args)
    summary = read_summary(run_dir)
    assert (
        summary["status"] == "completed" and summary["steps"] == 4 and summary["quant_val_loss"] is not None
    )


@pytest.mark.timeout(240)
def test_each_attempt_reports_its_own_error_and_a_run_s_record_outlives_later_failures(reference, tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-data"
    first = run_train(run_dir, "data=shards", f"data.path={missing}", check=False)
    assert first.returncode != 0 and str(missing) in error_lines(first)[0]
    assert str(missing) in read_summary(run_dir)["error"]  # a new folder records its failure
    other = tmp_path / "other-missing-data"
    second = run_train(run_dir, "data=shards", f"data.path={other}", check=False)
    assert str(other) in error_lines(second)[0] and str(missing) not in second.stdout + second.stderr
    assert str(other) in read_summary(run_dir)["error"]  # its own error, not the stale one
    # A completed run's record is never replaced by an attempt that fails before training.
    done = copy_run(reference, tmp_path / "done")
    kept = {
        p: p.read_bytes()
        for p in [done / "summary.json", done / "metrics.jsonl", *(done / ".hydra").iterdir()]
    }
    third = run_train(done, *EXACT, "data=shards", f"data.path={missing}", check=False)
    assert third.returncode != 0 and str(missing) in error_lines(third)[0]
    assert {p: p.read_bytes() for p in kept} == kept
    last = json.loads((done / "attempts.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "refused" and str(missing) in last["error"]
