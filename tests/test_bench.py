"""`python benchmarks/bench.py` (make bench): the plumbing, at tiny sizes (the numbers themselves mean nothing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench import TINY_SIZES, Result, exit_code
from tests.conftest import REPO, cli_env


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--tiny", "--out", str(out), *args],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.timeout(240)
def test_every_section_reports_a_row_in_the_table_and_the_json(tmp_path: Path, corpus: Path) -> None:
    proc, report = run_bench(tmp_path)
    rows = {r["metric"]: r for r in report["results"]}
    for metric in rows:
        assert metric in proc.stdout  # the printed table has every row

    ratio = rows["trainer / bare step, CPU time"] if not torch.cuda.is_available() else None
    if ratio is not None:
        assert ratio["target"] == ["<=", 1.03]
        assert 0.2 < ratio["value"] < 5.0
        details = ratio["details"]
        # Step by step the two loops did exactly the same work: same batches, same updates.
        assert details["max_weight_difference"] == 0.0
        runs, steps, skip = TINY_SIZES.min_runs, TINY_SIZES.steps, TINY_SIZES.skip
        # The trainer's last step has no next request to end it; the bare loop's steps all count.
        assert len(details["trainer_step_ms"]["cpu"]) == runs * (steps - 1 - skip)
        assert len(details["bare_step_ms"]["cpu"]) == runs * (steps - skip)
        assert all(ms > 0 for ms in details["bare_step_ms"]["wall"])
        assert rows["GPU tokens/s and MFU per speed feature"]["status"] == "skipped"

    for world_size in (1, 8):
        assert rows[f"loader tokens/s per rank (rank 0 of {world_size})"]["value"] > 0
    assert rows["evaluation tokens/s"]["value"] > 0
    cached = rows["sampling tokens/s, KV cache"]
    assert cached["value"] > 0 and cached["details"]["same_tokens_as_recomputing"]
    assert rows["sampling tokens/s, recomputing the sequence"]["value"] > 0
    assert 0 < rows["--cfg job latency (median)"]["value"] < 60
    first_step = rows["time to first step"]
    assert first_step["status"] == "info", first_step["note"]
    assert 0 < first_step["value"] < 240
    assert report["wall_s"] > 0 and report["machine"]["cpu_count"] >= 1
    # One trained model in every export variant: its size and what the round trip costs in bpb.
    variants = [
        r for name, r in rows.items() if name.startswith("export ") and name.endswith(": artifact size")
    ]
    assert len(variants) == 8 and all(r["value"] > 0 and "round trip" in r["note"] for r in variants)
    assert rows["export int8_zlib: artifact size"]["details"]["file"] == "final_model.int8.ptz"


@pytest.mark.timeout(120)
def test_only_runs_the_sections_asked_for(tmp_path: Path, corpus: Path) -> None:
    _, report = run_bench(tmp_path, "--only", "data")
    assert [r["metric"] for r in report["results"]] == [
        "loader tokens/s per rank (rank 0 of 1)",
        "loader tokens/s per rank (rank 0 of 8)",
        "speedrun.prepare peak memory (2 MB JSONL)",
        "speedrun.prepare throughput",
        "speedrun.prepare peak memory (one 1 MB document)",
    ]
    # The prepare run really happened: a tokenizer, shards and memory of its processes were measured.
    prepare = report["results"][2]
    assert prepare["target"] == ["<=", 1024.0] and prepare["value"] > 10, prepare
    assert report["results"][3]["value"] > 0
    long_document = report["results"][4]
    assert long_document["target"] == ["<=", 400.0] and long_document["value"] > 10, long_document


def test_check_exits_1_only_when_a_measured_target_is_missed() -> None:
    passed = Result("ratio", 1.01, "x", ("<=", 1.03))
    missed = Result("loader", 50.0, "M tok/s", (">=", 100.0))
    skipped = Result("gpu", None, "", note="no CUDA", skipped=True)
    failed = Result("first step", None, "s", note="failed (exit 1)")
    assert [r.status for r in (passed, missed, skipped, failed)] == ["pass", "fail", "skipped", "fail"]
    assert exit_code([passed, skipped], check=True) == 0
    assert exit_code([passed, missed], check=True) == 1
    assert exit_code([passed, failed], check=True) == 1
    assert exit_code([passed, missed], check=False) == 0  # without --check it is a report
