"""WandbSink against the real wandb library, offline: each run is read back from its .wandb file."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedrun.sinks import WandbSink, build_sinks
from speedrun.sinks.wandb_reader import find_offline_runs, read_offline_run
from tests.conftest import REPO, TINY, cli_env, read_summary

CONFIG = {"optimizer": {"matrix_lr": 0.02}, "data": {"seq_len": 1024}, "seed": 1337}


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")


def train_record(step: int) -> dict:
    return {
        "step": step,
        "tokens": step * 4096,
        "train_time_ms": step * 40.0,
        "train/loss": 4.0 - 0.1 * step,
        "train/tok_per_sec": 1e5,
        "train/mfu": None,
        "lr_scale": 1.0,
        "step_ms": 40.0,
    }


def val_record(step: int, bpb: float) -> dict:
    return {
        "step": step,
        "tokens": step * 4096,
        "train_time_ms": step * 40.0,
        "val/loss": 2 * bpb,
        "val/bpb": bpb,
    }


def make_sink(run_dir, name: str, job_type: str = "lr", **overrides) -> WandbSink:
    run_info = {"sweep_dir_name": "2026-01-01_00-00-00", "sweep_preset": job_type, "job_name": name}
    arguments = dict(project="speedrun", mode="offline", run_dir=run_dir, tags=["test"], config=CONFIG)
    return WandbSink(run_info=run_info, **{**arguments, **overrides})


def test_offline_run_through_build_sinks_reads_back(tmp_path):
    sinks = build_sinks(
        logger_factory=functools.partial(WandbSink, project="speedrun", mode="offline", tags=["a", "b"]),
        run_dir=tmp_path,
        config=CONFIG,
        run_info={"sweep_dir_name": "2026-01-01_00-00-00", "sweep_preset": "lr", "job_name": "0_lr=0.02"},
        is_rank0=True,
        total_steps=4,
        max_wallclock_ms=None,
        tokens_per_step=4096,
        log=logging.getLogger("test_wandb_sink"),
    )
    for step in (1, 2):
        sinks.log(train_record(step))
    sinks.log(val_record(2, 1.9))
    sinks.log(train_record(3))
    sinks.log(val_record(4, 1.7))
    sinks.log(
        {"step": 4, "tokens": 4 * 4096, "train_time_ms": 160.0, "quant/val_loss": 3.45, "quant/val_bpb": 1.72}
    )
    sinks.finish(
        {
            "status": "completed",
            "val_bpb": 1.7,
            "val_loss": 3.4,
            "quant_val_bpb": 1.72,
            "quant_val_loss": 3.45,
        }
        | {"steps": 4, "tokens_seen": 16384, "artifact_bytes": 12345, "mfu": None, "error": None}
    )

    run = read_offline_run(tmp_path)
    assert (run["group"], run["job_type"], run["name"]) == ("2026-01-01_00-00-00", "lr", "0_lr=0.02")
    assert run["tags"] == ["a", "b"]
    assert run["config"] == CONFIG
    history = run["history"]
    assert [row["train/loss"] for row in history if "train/loss" in row] == pytest.approx([3.9, 3.8, 3.7])
    assert [(row["tokens"], row["val/bpb"]) for row in history if "val/bpb" in row] == [
        (8192, 1.9),
        (16384, 1.7),
    ]
    assert all("tokens" in row and "train/mfu" not in row for row in history)
    assert history[0]["train/lr_scale"] == 1.0 and history[0]["train_time_s"] == pytest.approx(0.04)
    summary = run["summary"]
    assert summary["val/bpb"] == {"min": 1.7}
    assert summary["val/bpb_final"] == 1.7 and summary["quant/val_bpb"] == 1.72
    assert (summary["status"], summary["steps"], summary["tokens_seen"], summary["artifact_bytes"]) == (
        "completed",
        4,
        16384,
        12345,
    )
    assert "error" not in summary and "mfu" not in summary
    assert run["exit_code"] == 0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 6


def test_sweep_jobs_in_one_process_are_separate_runs(tmp_path):
    # Sequential, as a sweep's jobs are...
    first = make_sink(tmp_path / "0", "job0")
    first.log(val_record(1, 2.0))
    first.finish({"status": "completed"})
    second = make_sink(tmp_path / "1", "job1")
    # ...and overlapping, which only works when wandb creates a new run instead of returning the open one.
    third = make_sink(tmp_path / "2", "job2", job_type="seed")
    for step in (1, 2):
        second.log(val_record(step, 1.5))
    third.log(train_record(1))
    third.finish({"status": "completed"})
    second.finish({"status": "failed", "error": "boom"})

    runs = [read_offline_run(tmp_path / job) for job in ("0", "1", "2")]
    assert [run["name"] for run in runs] == ["job0", "job1", "job2"]
    assert [len(run["history"]) for run in runs] == [1, 2, 1]
    assert [run["exit_code"] for run in runs] == [0, 1, 0]
    assert runs[2]["job_type"] == "seed" and runs[1]["summary"]["error"] == "boom"
    assert len({find_offline_runs(tmp_path / job)[0].name for job in ("0", "1", "2")}) == 3


def test_bad_mode_degrades_to_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="speedrun.sinks.wandb_sink"):
        sink = make_sink(tmp_path, "job0", mode="bogus")
        sink.log(train_record(1))
        sink.finish({"status": "completed"})
    assert not sink.active
    assert len(caplog.records) == 1 and "wandb.init(mode='bogus'" in caplog.records[0].getMessage()
    assert find_offline_runs(tmp_path) == []


def test_online_without_credentials_degrades_to_one_warning(tmp_path, monkeypatch, caplog):
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # should it try the network, it fails at once
    with caplog.at_level(logging.WARNING, logger="speedrun.sinks.wandb_sink"):
        sink = make_sink(tmp_path, "job0", mode="online")
        sink.log(train_record(1))
        sink.finish({"status": "completed"})
    assert not sink.active
    assert len(caplog.records) == 1 and "metrics.jsonl and summary.json are still written" in caplog.text


def test_reader_rejects_a_corrupt_file(tmp_path):
    sink = make_sink(tmp_path, "job0")
    sink.log(train_record(1))
    sink.finish({"status": "completed"})
    (path,) = find_offline_runs(tmp_path)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_offline_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no offline wandb run"):
        read_offline_run(tmp_path / "elsewhere")


def wandb_services() -> list[int]:
    """The pids of wandb's service processes (wandb-core) that this process started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and name == "wandb-core":
            pids.append(int(stat.parent.name))
    return pids


def test_an_offline_run_survives_its_service_stopped_by_a_signal(tmp_path):
    """SLURM signals every process of a job (scancel, pre-emption, requeue), and wandb's service exits
    on SIGTERM (wandb/wandb#9963): the run is written again from the rows logged, complete."""
    sink = make_sink(tmp_path, "signalled")
    for step in range(1, 6):
        sink.log(train_record(step))
    (service,) = wandb_services()
    os.kill(service, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while service in wandb_services() and time.monotonic() < deadline:
        time.sleep(0.02)
    for step in range(6, 11):
        sink.log(train_record(step))
    sink.log(val_record(10, 1.5))
    sink.finish({"status": "interrupted", "steps": 10})

    assert len(find_offline_runs(tmp_path)) == 1, "the broken run is replaced, not kept beside the new one"
    run = read_offline_run(tmp_path)
    assert [row["step"] for row in run["history"]] == [*range(1, 11), 10]
    assert run["history"][-1]["val/bpb"] == 1.5 and run["name"] == "signalled" and run["config"] == CONFIG
    assert run["exit_code"] == 1 and run["summary"]["status"] == "interrupted"
    # wandb works on in this process: the next run starts its own service.
    after = make_sink(tmp_path / "next", "next")
    after.log(train_record(1))
    after.finish({"status": "completed"})
    assert read_offline_run(tmp_path / "next")["exit_code"] == 0


@pytest.mark.timeout(120)
def test_a_run_stopped_by_a_local_sigterm_leaves_a_complete_offline_run(corpus, tmp_path):
    """SIGTERM to the training command's process group (as a scheduler stops a job): the run stops at
    a step boundary and its offline wandb run holds every row of metrics.jsonl and an exit record."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "speedrun.train", *TINY, "logger=wandb", "optimizer=adamw",
               "trainer.max_steps=100000", "trainer.log_every=1", "trainer.val_every=0", "trainer.export=false",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while sum("train/loss" in row for row in metrics_rows(run_dir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert read_summary(run_dir)["status"] == "interrupted"
    assert len(find_offline_runs(run_dir)) == 1
    run = read_offline_run(run_dir)
    assert [row["step"] for row in run["history"]] == [row["step"] for row in metrics_rows(run_dir)]
    assert run["exit_code"] == 1


def metrics_rows(run_dir) -> list[dict]:
    """The complete lines of metrics.jsonl so far (the last one may be half-written)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []
