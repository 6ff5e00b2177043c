"""speedrun-compare over run folders written as DESIGN.md lays them out (synthetic ones with known answers,
and two real tiny seed sweeps), run as a real subprocess; the figure is inspected in-process."""

from __future__ import annotations

import csv
import json
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import yaml
from matplotlib.colors import to_hex

from speedrun.compare import figure_of, load_jobs, main, read_curves, swept_overrides, varying_keys
from speedrun.stats import power
from tests.conftest import cli_env

# parameter-golf's record README: three seeds of the final int8 round-trip val_bpb; SOTA and the margin.
RECORD_SEEDS = {1337: 1.20143417, 1338: 1.19945102, 1339: 1.20319508}
RECORD_SOTA, RECORD_MARGIN = 1.21613611, 0.005
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(
    folder: Path,
    overrides: list[str],
    final_bpb: float | None,
    status: str = "completed",
    error: str | None = None,
    curve: list[tuple[int, int, float, float]] | None = None,
    curve_key: str = "val/bpb",
    **summary_fields: object,
) -> Path:
    """A run folder: .hydra/overrides.yaml, metrics.jsonl and (unless final_bpb is None) summary.json.

    `curve` holds (step, tokens, train_time_ms, value) evaluations of `curve_key`; by default three
    evaluations falling to final_bpb, the first the untrained step 0.
    """
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = int(next((o.split("=")[1] for o in overrides if o.startswith("seed=")), 1337))
    bpb = final_bpb if final_bpb is not None else 3.0
    if curve is None:
        curve = [(0, 0, 0.0, bpb + 3.0), (100, 819_200, 4500.0, bpb + 1.0), (200, 1_638_400, 9000.0, bpb)]
    with (folder / "metrics.jsonl").open("w") as file:
        for step, tokens, ms, value in curve:
            base = {"step": step, "tokens": tokens, "train_time_ms": ms}
            file.write(json.dumps({**base, "train/loss": 4.0, "lr_scale": 1.0, "step_ms": 45.0}) + "\n")
            file.write(json.dumps({**base, curve_key: value}) + "\n")
        file.write('{"step": 300, "tokens": 24')  # cut short by a crash
    if final_bpb is None:
        return folder
    completed = status == "completed"
    summary = {
        "status": status,
        "val_loss": 2 * final_bpb,
        "val_bpb": final_bpb - 0.003 if completed else None,
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
        **summary_fields,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def write_seed_sweep(sweep: Path, values: dict[tuple, float], keys: list[str], defaults: dict | None = None):
    """A sweep folder: one job per (values of keys..., seed) -> final bpb, and multirun.yaml (the sweep's
    config without the swept values: `defaults`)."""
    for job, (setting, bpb) in enumerate(values.items()):
        overrides = [f"{key}={value}" for key, value in zip(keys, setting, strict=True)]
        write_run(sweep / f"{job}_{','.join(overrides)}", ["+sweep=test", *overrides], bpb)
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {}}}, **(defaults or {})})
    )
    return sweep


def run_compare(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "speedrun.compare", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120)


def section_rows(text: str, heading: str) -> list[dict[str, str]]:
    """The markdown table that follows `heading`, as one dict per row."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return [dict(zip(table[0], row, strict=True)) for row in table[2:]]


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
    # Seeds grouped by learning rate, best mean first: (1.221 + 1.225) / 2; the diverged and missing
    # lr=0.9 jobs form no setting.
    settings = section_rows(markdown, "## Settings (quant_val_bpb)")
    assert [(s["setting"], s["n"], s["mean quant_val_bpb"]) for s in settings] == [
        ("optimizer.matrix_lr=0.02", "2", "1.223000"),
        ("optimizer.matrix_lr=0.01", "2", "1.252000"),
        ("optimizer.matrix_lr=0.2", "2", "1.305000"),
    ]
    assert settings[0]["std"] == f"{statistics.stdev([1.221, 1.225]):.6f}"
    # Every learning rate is overridden and multirun.yaml does not name a default: no baseline to guess.
    assert "No baseline setting" in markdown and "## Against the baseline" not in markdown
    assert markdown.splitlines()[4] in result.stdout

    # Three panels (the 1-D sweep adds final bpb vs learning rate), 6 x 4.5 inches each at 110 dpi, in one
    # row (the diverged run's curve, 12.9 to 9.9, spans the second half: no zoom would help), and below
    # them the legend: 8 labels of 22 characters fit 7 to a row, so 2 rows of 0.22 inches, plus 0.15.
    width, height = png_size(lr_sweep / "comparison.png")
    assert (width, height) == (3 * 6 * 110, int((4.5 + 2 * 0.22 + 0.15) * 110))


def test_record_rule_reproduces_the_parameter_golf_significance_note(tmp_path):
    runs = [write_run(tmp_path / f"seed{seed}", [f"seed={seed}"], bpb) for seed, bpb in RECORD_SEEDS.items()]
    out = tmp_path / "report"
    args = ["--target", str(RECORD_SOTA), "--margin", str(RECORD_MARGIN)]
    result = run_compare(*runs, "--out", out, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (row,) = section_rows(result.stdout, "## Settings")
    # README: mean 1.20136009, std 0.00187, t=9.06 (exactly 9.04), df=2, p=0.006; beats 1.21113611.
    assert list(row.values())[:8] == [
        "all runs",
        "3",
        "1.201360",
        "0.001873",
        "-9.04",
        "2",
        "0.006009",
        "yes",
    ]
    assert "1.2111361 = 1.21613611 - margin 0.005" in result.stdout
    # Seeds needed: the fewest n whose power to show the observed margin at p < 0.01 reaches 80%.
    values = list(RECORD_SEEDS.values())
    margin, std = RECORD_SOTA - RECORD_MARGIN - statistics.fmean(values), statistics.stdev(values)
    n = int(row["seeds needed"])
    assert power(n, margin, std, 0.01, 1, False) >= 0.8 > power(n - 1, margin, std, 0.01, 1, False)
    assert png_size(out / "comparison.png")[0] == 2 * 6 * 110  # no swept key besides seed: two panels
    assert not (runs[0] / "comparison.md").exists()

    # The same data is not significant at p < 0.001; main() in-process takes the same arguments.
    assert main([str(run) for run in runs] + ["--out", str(out), *args, "--alpha", "0.001"]) == 0
    assert "| 0.006009 | no " in (out / "comparison.md").read_text()


def test_two_seed_sweeps_welch_paired_and_seeds_needed(tmp_path):
    """A candidate sweep against a baseline sweep with the same three seeds and the same overrides (the
    code differs): Welch's test, the paired test over the seeds, and the seeds a test of that Δ needs."""
    baseline = {1: 3.2841, 2: 3.2795, 3: 3.2822}
    candidate = {1: 3.2823, 2: 3.2772, 3: 3.2806}  # about 0.002 below the baseline for each seed
    base = write_seed_sweep(tmp_path / "base_sweep", {(s,): v for s, v in baseline.items()}, ["seed"])
    cand = write_seed_sweep(tmp_path / "cand_sweep", {(s,): v for s, v in candidate.items()}, ["seed"])
    result = run_compare(cand, "--baseline", base, "--alternative", "less", "--alpha", "0.05", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Baseline: the runs given with --baseline (n=3, mean 3.281933)" in result.stdout
    (row,) = section_rows(result.stdout, "## Against the baseline")

    welch = scipy.stats.ttest_ind(
        list(candidate.values()), list(baseline.values()), equal_var=False, alternative="less"
    )
    interval = welch.confidence_interval(0.95)
    rel = scipy.stats.ttest_rel(list(candidate.values()), list(baseline.values()), alternative="less")
    delta = statistics.fmean(candidate.values()) - statistics.fmean(baseline.values())
    assert row == {
        "setting": "cand_sweep",
        "n": "3",
        "mean quant_val_bpb": f"{statistics.fmean(candidate.values()):.6f}",
        "Δ": f"{delta:+.6f}",
        "95% CI of Δ": f"[{interval.low:+.6f}, {interval.high:+.6f}]",
        "Welch t": f"{welch.statistic:.2f}",
        "df": f"{welch.df:.1f}",
        "p": f"{welch.pvalue:.4g}",
        "paired n": "3",
        "paired p": f"{rel.pvalue:.4g}",
        "seeds needed": row["seeds needed"],
    }
    # The seed moves both settings alike: Welch's test cannot see the difference, pairing by seed does.
    assert interval.low == float("-inf") and welch.pvalue > 0.05 > rel.pvalue
    spread = ((statistics.variance(candidate.values()) + statistics.variance(baseline.values())) / 2) ** 0.5
    n = int(row["seeds needed"])
    assert power(n, -delta, spread, 0.05, 2, False) >= 0.8 > power(n - 1, -delta, spread, 0.05, 2, False)
    # Both sweeps appear in the job table; the written report matches the printed one.
    assert (cand / "comparison.md").read_text().count("| completed") == 6


def test_ablation_delta_table_against_a_key_value_baseline(tmp_path):
    """`+sweep=ablate`'s shape: a baseline and each trick switched off, x 3 seeds; Δ per setting."""
    finals = {
        ("none", 1): 3.301, ("none", 2): 3.297, ("none", 3): 3.305,
        ("unet_skips", 1): 3.342, ("unet_skips", 2): 3.339, ("unet_skips", 3): 3.351,
        ("qk_norm", 1): 3.299, ("qk_norm", 2): 3.306, ("qk_norm", 3): 3.296,
    }  # fmt: skip
    sweep = write_seed_sweep(tmp_path / "ablate", finals, ["+ablate", "seed"])
    result = run_compare(sweep, "--baseline", "ablate=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["setting"]: row for row in section_rows(result.stdout, "## Against the baseline")}
    assert set(rows) == {"ablate=unet_skips", "ablate=qk_norm"}
    base = [finals["none", seed] for seed in (1, 2, 3)]
    for trick, row in rows.items():
        values = [finals[trick.split("=")[1], seed] for seed in (1, 2, 3)]
        welch = scipy.stats.ttest_ind(values, base, equal_var=False)
        interval = welch.confidence_interval(0.99)
        assert row["Δ"] == f"{statistics.fmean(values) - statistics.fmean(base):+.6f}"
        assert row["99% CI of Δ"] == f"[{interval.low:+.6f}, {interval.high:+.6f}]"
        assert (row["p"], row["n"], row["paired n"]) == (f"{welch.pvalue:.4g}", "3", "3")
    # U-net skips matter (p < 0.01, the interval excludes 0); QK-norm's Δ is noise and needs many seeds.
    assert float(rows["ablate=unet_skips"]["p"]) < 0.01 and float(rows["ablate=qk_norm"]["p"]) > 0.5
    assert int(rows["ablate=qk_norm"]["seeds needed"]) > 100 * int(rows["ablate=unet_skips"]["seeds needed"])


def test_baseline_is_the_setting_at_the_sweeps_defaults(tmp_path):
    # multirun.yaml holds the sweep's config without the swept values: qk_norm defaults to true.
    finals = {
        (flag, seed): 3.30 + (0.02 if flag == "false" else 0) + seed / 1000
        for flag in ("true", "false")
        for seed in (1, 2)
    }
    sweep = write_seed_sweep(
        tmp_path / "sweep", finals, ["model.qk_norm", "seed"], {"model": {"qk_norm": True}}
    )
    result = run_compare(sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Baseline: model.qk_norm=true (n=2" in result.stdout
    (row,) = section_rows(result.stdout, "## Against the baseline")
    assert (row["setting"], row["Δ"]) == ("model.qk_norm=false", "+0.020000")

    # Loose runs: the one that did not override the learning rate ran the default.
    loose = []
    for time, lr in (("10-00-00", None), ("10-05-00", None), ("11-00-00", "0.03"), ("11-05-00", "0.03")):
        seed = ["seed=1"] if time.endswith("00-00") else ["seed=2"]
        overrides = seed + ([f"optimizer.matrix_lr={lr}"] if lr else [])
        loose.append(write_run(tmp_path / "outputs" / "2026-01-01" / time, overrides, 1.25 if lr else 1.26))
    result = run_compare(*loose, "--out", tmp_path / "loose", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Baseline: optimizer.matrix_lr=default (n=2, mean 1.260000)" in result.stdout


def test_reach_interpolates_training_time_and_tokens(tmp_path):
    """Time and tokens to val_loss <= 3.28, with answers worked out by hand."""
    sweep = tmp_path / "sweep"
    curves = {
        # 3.5 -> 3.2 between 20 s and 40 s: 3.28 is (3.5 - 3.28) / 0.3 = 11/15 of the way.
        "0_lr=0.02,seed=1": [(0, 0, 0.0, 10.8), (100, 10**6, 20_000.0, 3.5), (200, 2 * 10**6, 40_000.0, 3.2)],
        # Exactly 3.28 at an evaluation: that evaluation.
        "1_lr=0.02,seed=2": [
            (0, 0, 0.0, 10.8),
            (100, 10**6, 25_000.0, 3.28),
            (200, 2 * 10**6, 50_000.0, 3.1),
        ],
        # Never below 3.28.
        "2_lr=0.1,seed=1": [(0, 0, 0.0, 10.8), (100, 10**6, 20_000.0, 3.4), (200, 2 * 10**6, 40_000.0, 3.3)],
    }
    for name, curve in curves.items():
        lr, seed = (part.split("=")[1] for part in name.split("_", 1)[1].split(","))
        write_run(sweep / name, [f"optimizer.matrix_lr={lr}", f"seed={seed}"], curve[-1][3] / 2,
                  curve=curve, curve_key="val/loss")  # fmt: skip
    result = run_compare(sweep, "--reach", "3.28", "--metric", "val_loss", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    rows = {row["job"]: row for row in csv.DictReader((sweep / "comparison.csv").open())}
    first_seconds, first_tokens = 20 + 11 / 15 * 20, 10**6 + 11 / 15 * 10**6
    assert float(rows["0_lr=0.02,seed=1"]["time_to_3.28_s"]) == pytest.approx(first_seconds, abs=1e-3)
    assert int(rows["0_lr=0.02,seed=1"]["tokens_to_3.28"]) == round(first_tokens)
    assert (rows["1_lr=0.02,seed=2"]["time_to_3.28_s"], rows["1_lr=0.02,seed=2"]["tokens_to_3.28"]) == (
        "25.0",
        "1000000",
    )
    assert rows["2_lr=0.1,seed=1"]["time_to_3.28_s"] == rows["2_lr=0.1,seed=1"]["tokens_to_3.28"] == ""

    settings = {row["setting"]: row for row in section_rows(result.stdout, "## Time to val/loss <= 3.28")}
    seconds, tokens = [first_seconds, 25.0], [first_tokens, 10**6]
    assert settings["optimizer.matrix_lr=0.02"] == {
        "setting": "optimizer.matrix_lr=0.02",
        "reached": "2/2",
        "training time (s)": f"{statistics.fmean(seconds):.4g} ± {statistics.stdev(seconds):.4g}",
        "tokens": f"{statistics.fmean(tokens):.4g} ± {statistics.stdev(tokens):.4g}",
    }
    assert settings["optimizer.matrix_lr=0.1"]["reached"] == "0/1"


def test_rules_verdicts_extra_columns_and_provenance_warnings(tmp_path):
    provenance = {
        "git_commit": "0123abc", "git_dirty": False, "git_diff_sha256": None, "speedrun_version": "0.1.0",
        "python": "3.11.9", "torch": "2.8.0", "cuda": "12.8", "nccl": "2.26.2", "gpu_name": "NVIDIA H100",
        "gpu_count": 8, "hostname": "node1", "command": "python -m speedrun.train", "data_manifest_sha256": "ab",
        "data_shards": 80, "tokenizer_sha256": "cd",
    }  # fmt: skip
    checks = [
        {"name": "artifact_bytes", "limit": 16_000_000, "value": 16_100_000, "pass": False},
        {"name": "train_time_ms", "limit": 600_000, "value": 612_000, "pass": False},
        {"name": "eval_time_ms", "limit": 600_000, "value": 50_000, "pass": True},
    ]
    runs = [
        write_run(tmp_path / "a", ["seed=1"], 1.20, rules={"preset": "pg_10min_16mb", "pass": True, "checks": checks[2:]},
                  provenance=provenance),
        write_run(tmp_path / "b", ["seed=2"], 1.21, rules={"preset": "pg_10min_16mb", "pass": False, "checks": checks},
                  provenance={**provenance, "hostname": "node2", "torch": "2.7.0"}),
        write_run(tmp_path / "c", ["seed=3"], 1.22, rules=None, provenance={**provenance, "command": "other"}),
    ]  # fmt: skip
    out = tmp_path / "report"
    result = run_compare(
        *runs, "--out", out, "--columns", "provenance.git_commit,params,rules.preset", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    # Only torch differs among the fields that must match (hostname and command may differ).
    assert result.stderr.splitlines() == [
        'warning: the runs differ in provenance.torch: "2.8.0" (a, c); "2.7.0" (b)'
    ]
    assert "the runs differ in provenance.torch" in (out / "comparison.md").read_text()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert list(rows[0])[:4] == ["job", "seed", "status", "rules"]
    assert list(rows[0])[-3:] == ["provenance.git_commit", "params", "rules.preset"]
    assert [(r["job"], r["rules"], r["provenance.git_commit"], r["rules.preset"]) for r in rows] == [
        ("a", "pass", "0123abc", "pg_10min_16mb"),
        ("b", "fail: artifact_bytes, train_time_ms", "0123abc", "pg_10min_16mb"),
        ("c", "", "0123abc", ""),
    ]
    assert "| fail: artifact_bytes, train_time_ms |" in result.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--alpha", "2"], "--alpha"),
        (["--alpha", "0"], "--alpha"),
        (["--target", "nan"], "--target"),
        (["--target", "inf"], "--target"),
        (["--margin", "five"], "--margin"),
        (["--power", "1"], "--power"),
        (["--effect", "-0.001"], "--effect"),
        (["--reach", "nan"], "--reach"),
        (["--alternative", "smaller"], "--alternative"),
        (["--metric", "val_bbp"], "--metric val_bbp"),
        (["--columns", "provenance.gitcommit"], "--columns provenance.gitcommit"),
        (["--baseline", "nonsense"], "--baseline nonsense"),
        (["--baseline", "optimizer.matrix_lr=0.5"], "--baseline optimizer.matrix_lr=0.5"),
        (["--reach", "3", "--metric", "steps"], "--reach"),
        (["NOWHERE"], "NOWHERE"),
        (["EMPTY"], "no run folder found in"),
    ],
)
def test_bad_input_is_one_error_line_and_keeps_the_last_report(lr_sweep, tmp_path, args, named):
    (tmp_path / "EMPTY" / "sub").mkdir(parents=True)
    (lr_sweep / "comparison.md").write_text("the previous report\n")
    paths = [lr_sweep] if args[0].startswith("--") else []
    result = run_compare(*paths, *args, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and named in line, line
    assert "Traceback" not in result.stdout + result.stderr
    assert (lr_sweep / "comparison.md").read_text() == "the previous report\n"


def test_unreadable_files_are_named_and_skipped_and_old_nan_files_read(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0_seed=1", ["seed=1"], 1.25)
    (sweep / "0_seed=1" / "metrics.jsonl").write_bytes(b'{"step": 0, "val/bpb": 4.1}\n\xff\xfe\x00binary')
    # Written before summary.json and metrics.jsonl were strict JSON: a bare NaN in each.
    nan_run = write_run(sweep / "1_seed=2", ["seed=2"], 1.24, val_bpb=float("nan"))
    with (nan_run / "metrics.jsonl").open("a") as file:
        file.write('\n{"step": 250, "tokens": 2048000, "train_time_ms": 11000.0, "val/bpb": NaN}\n')
    write_run(sweep / "2_seed=3", ["seed=3"], 1.26)
    (sweep / "2_seed=3" / "summary.json").write_bytes(b'{"status": "completed", "val_bpb": 1.2\xff}')
    result = run_compare(sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: {sweep / '2_seed=3' / 'summary.json'}: not UTF-8 text; left out of the comparison",
        f"warning: {sweep / '0_seed=1' / 'metrics.jsonl'}: not UTF-8 text; left out of the comparison",
    ]
    rows = {row["job"]: row for row in csv.DictReader((sweep / "comparison.csv").open())}
    assert rows["1_seed=2"]["status"] == "completed" and rows["1_seed=2"]["val_bpb"] == "nan"
    assert rows["0_seed=1"]["quant_val_bpb"] == "1.25"
    assert rows["2_seed=3"]["status"] == "missing" and "summary.json unreadable" in rows["2_seed=3"]["error"]
    # The NaN evaluation is no point of the curve; the unreadable file gives no curve at all.
    jobs = {job.name: job for job in load_jobs([sweep], [])}
    read_curves(list(jobs.values()), "val/bpb")
    figure = figure_of(list(jobs.values()), ["seed"], "quant_val_bpb", "val/bpb", None)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert len(lines["seed=2"].get_xdata()) == 3 and "seed=1" not in lines


def styles_of(axis) -> list[tuple[str, str, str]]:
    return [(to_hex(line.get_color()), line.get_linestyle(), line.get_marker()) for line in axis.get_lines()]


def test_twelve_job_sweep_gets_twelve_distinct_styles_and_readable_axes(tmp_path):
    # The `lr` preset's shape: 3 matrix LRs x 2 scalar LRs x 2 embedding LRs.
    grid = [(m, s, e) for m in ("0.02", "0.04", "0.06") for s in ("0.02", "0.04") for e in ("0.03", "0.05")]
    keys = ["optimizer.matrix_lr", "optimizer.scalar_lr", "optimizer.embed_lr"]
    sweep = write_seed_sweep(tmp_path / "lr", {v: 1.2 + i / 100 for i, v in enumerate(grid)}, keys)
    jobs = load_jobs([sweep], [])
    read_curves(jobs, "val/bpb")
    figure = figure_of(jobs, varying_keys(jobs), "quant_val_bpb", "val/bpb", None)
    curves_by_tokens = figure.axes[0]
    styles = styles_of(curves_by_tokens)
    assert len(styles) == 12 and len(set(styles)) == 12
    # A grid: colour follows (matrix_lr, scalar_lr), line style the embedding LR.
    assert len({colour for colour, _, _ in styles}) == 6 and len({style for _, style, _ in styles}) == 2
    assert styles_of(figure.axes[1]) == styles  # the same job looks the same against training time
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels[0] == "matrix_lr=0.02, scalar_lr=0.02, embed_lr=0.03" and len(set(labels)) == 12
    # Step 0 (the untrained 4.2+) is inside the axes; a second row zooms on the second half of training,
    # where the values (1.2 to 2.31) would fill a third of the full range.
    low, high = curves_by_tokens.get_ylim()
    assert high > 1.2 + 11 / 100 + 3.0 and low < 1.2
    zoomed = figure.axes[2]
    assert zoomed.get_xlim()[0] == pytest.approx(1_638_400 / 2) and zoomed.get_xlim()[1] < 1.02 * 1_638_400
    assert 1.1 < zoomed.get_ylim()[0] < 1.2 and 2.31 < zoomed.get_ylim()[1] < 2.5
    assert styles_of(zoomed) == styles

    # One swept key with 12 values: the ten colours, then the same colours dashed.
    sweep = write_seed_sweep(
        tmp_path / "one_key", {(f"0.0{i:02d}",): 1.2 for i in range(12)}, ["optimizer.matrix_lr"]
    )
    jobs = load_jobs([sweep], [])
    read_curves(jobs, "val/bpb")
    styles = styles_of(figure_of(jobs, varying_keys(jobs), "quant_val_bpb", "val/bpb", None).axes[0])
    assert len(set(styles)) == 12 and [style for _, style, _ in styles] == ["-"] * 10 + ["--"] * 2

    # 4 settings x 3 seeds: a colour per setting, a line style per seed.
    finals = {(lr, seed): 1.2 for lr in ("0.01", "0.02", "0.03", "0.04") for seed in (1, 2, 3)}
    sweep = write_seed_sweep(tmp_path / "seeds", finals, ["optimizer.matrix_lr", "seed"])
    jobs = load_jobs([sweep], [])
    read_curves(jobs, "val/bpb")
    styles = styles_of(figure_of(jobs, varying_keys(jobs), "quant_val_bpb", "val/bpb", None).axes[0])
    assert len(set(styles)) == 12
    assert len({colour for colour, _, _ in styles}) == 4 and len({style for _, style, _ in styles}) == 3


def test_compare_imports_scipy_and_matplotlib_only_when_it_needs_them():
    """Importing compare (for `--help`, or bad input) must not cost scipy and matplotlib (about a second)."""
    code = "import sys, speedrun.compare; print(sorted({'scipy', 'matplotlib'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_loose_runs_are_labelled_by_their_differing_overrides(tmp_path):
    day = tmp_path / "outputs" / "2026-01-01"
    runs = [
        write_run(day / "10-00-00", ["optimizer.matrix_lr=0.03", "data.seq_len=1024"], 1.22),
        write_run(day / "11-30-00", ["data.seq_len=1024"], 1.23),
        write_run(day / "12-45-00", ["data.seq_len=2048"], 1.21),
    ]
    jobs = load_jobs(runs, [])
    read_curves(jobs, "val/bpb")
    figure = figure_of(jobs, varying_keys(jobs), "quant_val_bpb", "val/bpb", None)
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "matrix_lr=0.03, seq_len=1024",
        "matrix_lr=default, seq_len=1024",
        "matrix_lr=default, seq_len=2048",
    ]


def test_swept_overrides_skip_presets_and_hydra_settings():
    lines = [
        "+sweep=lr",
        "hydra.launcher.n_jobs=2",
        "hydra/launcher=joblib",
        "optimizer.matrix_lr=0.02",
        "++seed=3",
    ]
    assert swept_overrides(lines) == {"optimizer.matrix_lr": "0.02", "seed": "3"}
