"""speedrun-compare over synthetic run folders written as DESIGN.md lays them out, run as a real subprocess."""

from __future__ import annotations

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from speedrun.compare import main, swept_overrides
from speedrun.stats import mean_and_std, regularized_incomplete_beta, student_t_sf, t_test_mean_below

# parameter-golf's record README: three seeds of the final int8 round-trip val_bpb, and the bar to beat.
RECORD_SEEDS = {1337: 1.20143417, 1338: 1.19945102, 1339: 1.20319508}
RECORD_TARGET = 1.21113611
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(
    folder: Path,
    overrides: list[str],
    final_bpb: float | None,
    status: str = "completed",
    error: str | None = None,
) -> Path:
    """A run folder: .hydra/overrides.yaml, metrics.jsonl and (unless final_bpb is None) summary.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = int(next((o.split("=")[1] for o in overrides if o.startswith("seed=")), 1337))
    bpb = final_bpb if final_bpb is not None else 3.0
    with (folder / "metrics.jsonl").open("w") as file:
        for step in (100, 200):
            base = {"step": step, "tokens": step * 8192, "train_time_ms": step * 45.0}
            file.write(json.dumps({**base, "train/loss": 4.0, "lr_scale": 1.0, "step_ms": 45.0}) + "\n")
            file.write(json.dumps({**base, "val/loss": 2 * bpb, "val/bpb": bpb + (200 - step) / 100}) + "\n")
        file.write('{"step": 300, "tokens": 24')  # cut short by a crash
    if final_bpb is None:
        return folder
    completed = status == "completed"
    summary = {
        "status": status,
        "val_loss": 2 * final_bpb,
        "val_bpb": final_bpb - 0.003 if completed else float("nan"),
        "quant_val_loss": 2 * final_bpb if completed else None,
        "quant_val_bpb": final_bpb if completed else None,
        "model_bytes": 15_820_684,
        "code_bytes": 47_759,
        "artifact_bytes": 15_868_443,
        "params": 17_059_912,
        "steps": 200,
        "tokens_seen": 200 * 8192,
        "train_time_ms": 9000.0,
        "step_avg_ms": 45.0,
        "tok_per_sec": 182044.4,
        "mfu": None,
        "peak_mem_mib": None,
        "world_size": 1,
        "seed": seed,
        "overrides": overrides,
        "error": error,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def run_compare(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "speedrun.compare", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def lr_sweep(tmp_path) -> Path:
    """A 1-D learning-rate sweep with two seeds per value, one failed job and one that died hard."""
    sweep = tmp_path / "multirun_outputs" / "2026-01-01_12-00-00"
    constant = ["+sweep=lr", "data.seq_len=1024", "hydra.launcher.n_jobs=1"]
    final = {
        (0.01, 1): 1.250,
        (0.01, 2): 1.254,
        (0.02, 1): 1.221,
        (0.02, 2): 1.225,
        (0.2, 1): 1.300,
        (0.2, 2): 1.31,
    }
    for job, ((lr, seed), bpb) in enumerate(final.items()):
        write_run(
            sweep / f"{job}_lr={lr},seed={seed}",
            [*constant, f"optimizer.matrix_lr={lr}", f"seed={seed}"],
            bpb,
        )
    write_run(
        sweep / "6_lr=0.9,seed=1",
        [*constant, "optimizer.matrix_lr=0.9", "seed=1"],
        9.9,
        status="diverged",
        error="loss nan at step 12 (trainer.max_loss=10)",
    )
    write_run(sweep / "7_lr=0.9,seed=2", [*constant, "optimizer.matrix_lr=0.9", "seed=2"], None)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_sweep_table_csv_markdown_and_plot(lr_sweep, tmp_path):
    result = run_compare(lr_sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    with (lr_sweep / "comparison.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == [
        "job",
        "optimizer.matrix_lr",
        "seed",
        "status",
        "val_bpb",
        "quant_val_bpb",
        "artifact_bytes",
        "steps",
        "step_avg_ms",
        "error",
    ]
    # Best quant_val_bpb first; the diverged and the missing job last, with their reasons.
    assert [row["job"] for row in rows] == [
        "2_lr=0.02,seed=1",
        "3_lr=0.02,seed=2",
        "0_lr=0.01,seed=1",
        "1_lr=0.01,seed=2",
        "4_lr=0.2,seed=1",
        "5_lr=0.2,seed=2",
        "6_lr=0.9,seed=1",
        "7_lr=0.9,seed=2",
    ]
    assert rows[0]["quant_val_bpb"] == "1.221" and float(rows[0]["val_bpb"]) == pytest.approx(1.218)
    assert rows[0]["optimizer.matrix_lr"] == "0.02" and rows[0]["seed"] == "1" and rows[0]["error"] == ""
    assert (rows[-2]["status"], rows[-2]["error"]) == (
        "diverged",
        "loss nan at step 12 (trainer.max_loss=10)",
    )
    assert rows[-1]["status"] == "missing" and "no summary.json" in rows[-1]["error"]

    markdown = (lr_sweep / "comparison.md").read_text()
    header = markdown.splitlines()[4]
    assert header.startswith("| job ") and "optimizer.matrix_lr" in header
    for constant in ("data.seq_len", "sweep", "hydra"):
        assert constant not in header
    assert "| 2_lr=0.02,seed=1 | 0.02" in markdown and "15,868,443" in markdown
    # Seeds grouped by learning rate, best mean first: (1.221 + 1.225) / 2.
    assert "## Seed groups (quant_val_bpb)" in markdown
    group_lines = [line for line in markdown.splitlines() if line.startswith("| optimizer.matrix_lr=")]
    assert [cell.strip() for cell in group_lines[0].split("|")[1:4]] == [
        "optimizer.matrix_lr=0.02",
        "2",
        "1.223000",
    ]
    assert len(group_lines) == 3  # the diverged/missing lr=0.9 jobs form no group
    assert markdown.splitlines()[4] in result.stdout

    # Three panels (the 1-D sweep adds final bpb vs learning rate): 3 × 6 inches at 110 dpi.
    width, height = png_size(lr_sweep / "comparison.png")
    assert (width, height) == (3 * 6 * 110, int(4.5 * 110))


def test_seed_t_test_reproduces_the_parameter_golf_record(tmp_path):
    runs = [write_run(tmp_path / f"seed{seed}", [f"seed={seed}"], bpb) for seed, bpb in RECORD_SEEDS.items()]
    out = tmp_path / "report"
    result = run_compare(*runs, "--out", out, "--target", str(RECORD_TARGET), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (group,) = [line for line in result.stdout.splitlines() if line.startswith("| all runs")]
    cells = [cell.strip() for cell in group.split("|")[1:-1]]
    # README: mean 1.20136009, std 0.00187, t=9.06 (from the rounded std; unrounded it is 9.04), df=2, p=0.006.
    assert cells == ["all runs", "3", "1.201360", "0.001873", "9.04", "2", "0.006009", "yes"]
    assert png_size(out / "comparison.png")[0] == 2 * 6 * 110  # no swept key besides seed: two panels
    assert not (runs[0] / "comparison.md").exists()

    # The same data is not significant at p < 0.001; main() in-process takes the same arguments.
    assert (
        main(
            [str(run) for run in runs]
            + ["--out", str(out), "--target", str(RECORD_TARGET), "--alpha", "0.001"]
        )
        == 0
    )
    assert "| 0.006009 | no" in (out / "comparison.md").read_text()


def test_no_run_folder_exits_2_with_a_message(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = run_compare(tmp_path / "empty", cwd=tmp_path)
    assert result.returncode == 2
    assert "no run folder found in" in result.stderr and "empty" in result.stderr
    assert main([str(tmp_path / "nowhere")]) == 2


def test_unknown_metric_exits_2(tmp_path, capsys):
    write_run(tmp_path / "run", ["seed=1"], 1.2)
    assert main([str(tmp_path / "run"), "--metric", "val_bbp"]) == 2
    assert "--metric val_bbp" in capsys.readouterr().err
    assert not (tmp_path / "run" / "comparison.md").exists()


def test_swept_overrides_skip_presets_and_hydra_settings():
    lines = [
        "+sweep=lr",
        "hydra.launcher.n_jobs=2",
        "hydra/launcher=joblib",
        "optimizer.matrix_lr=0.02",
        "++seed=3",
    ]
    assert swept_overrides(lines) == {"optimizer.matrix_lr": "0.02", "seed": "3"}


def test_parameter_golf_t_test():
    result = t_test_mean_below(list(RECORD_SEEDS.values()), RECORD_TARGET)
    assert result.df == 2
    assert result.t == pytest.approx(9.06, abs=0.03)
    assert result.p == pytest.approx(0.006, abs=0.0005)
    mean, std = mean_and_std(list(RECORD_SEEDS.values()))
    assert mean == pytest.approx(1.20136009, abs=1e-8) and std == pytest.approx(0.00187, abs=5e-6)


@pytest.mark.parametrize("t", [-4.0, -0.7, 0.0, 0.3, 1.0, 2.5, 9.06, 50.0])
def test_student_t_tail_matches_closed_forms(t):
    # df=1 is the Cauchy distribution; df=2 has an algebraic CDF.
    assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_incomplete_beta_and_large_df():
    # I_x(2, 3) is a binomial tail: P(at least 2 of 4 successes with p = 0.4).
    assert regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    assert regularized_incomplete_beta(0.5, 0.5, 0.9) == pytest.approx(
        2 / math.pi * math.asin(math.sqrt(0.9))
    )
    assert student_t_sf(1.959963985, 1e7) == pytest.approx(0.025, abs=1e-6)  # the normal limit
    assert student_t_sf(2.0, 30) == pytest.approx(0.027312522, abs=1e-8)
