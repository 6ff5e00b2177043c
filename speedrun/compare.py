"""Compare runs side by side: `python -m speedrun.compare PATH... [--out DIR] [--target T]`.

PATH is a run folder (it holds summary.json, metrics.jsonl, .hydra/) or a sweep folder whose subfolders
are run folders. The result is one row per job with the overrides that differ between jobs, printed and
written as comparison.md and comparison.csv, plus curves in comparison.png. Jobs that differ only in
`seed` form groups (mean, sample std, n) and, given `--target`, a one-sided t-test of "mean < target".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speedrun.cli import Parser
from speedrun.stats import TTest, mean_and_std, t_test_mean_below

# Summary fields shown for every job, in this order, after the swept overrides.
SUMMARY_COLUMNS = ["status", "val_bpb", "quant_val_bpb", "artifact_bytes", "steps", "step_avg_ms"]
COMPLETED = "completed"
MISSING = "missing"


@dataclass
class Job:
    """One run folder as the comparison sees it."""

    name: str
    path: Path
    summary: dict
    overrides: dict[str, str]  # the swept values: override key -> value as written on the command line
    status: str
    error: str | None
    val_curve: list[dict] = field(default_factory=list)  # metrics.jsonl records that hold val/bpb

    def number(self, key: str) -> float | None:
        """A finite numeric summary value, else None (absent, null, NaN after divergence)."""
        value = self.summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return None


def is_run_folder(path: Path) -> bool:
    return (
        (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file() or (path / ".hydra").is_dir()
    )


def natural_key(text: str) -> list:
    """Sort "2_lr=…" before "10_lr=…", as Hydra numbers its jobs."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_run_folders(paths: list[Path]) -> list[Path]:
    """Each path if it is a run folder, else its subfolders that are (one level down)."""
    found = []
    for path in paths:
        if is_run_folder(path):
            found.append(path)
        else:
            subfolders = [sub for sub in path.iterdir() if sub.is_dir() and not sub.name.startswith(".")]
            found.extend(
                sorted((sub for sub in subfolders if is_run_folder(sub)), key=lambda p: natural_key(p.name))
            )
    return found


def swept_overrides(lines: list[str]) -> dict[str, str]:
    """`key=value` overrides that set a value; sweep presets (`+sweep=lr`) and `hydra.*` settings are not
    values of the experiment."""
    values = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        key = key.lstrip("+")
        if key == "sweep" or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        values[key] = value
    return values


def read_val_curve(path: Path) -> list[dict]:
    """The val/bpb records of metrics.jsonl; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("val/bpb"), (int, float)):
            records.append(record)
    return records


def load_job(path: Path) -> Job:
    summary_path = path / "summary.json"
    summary: dict = {}
    error = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            error = f"summary.json unreadable: {exc}"
        if not isinstance(summary, dict):
            summary, error = {}, "summary.json is not a JSON object"
    else:
        error = "no summary.json: the job died before writing it (see its train.log)"
    overrides_path = path / ".hydra" / "overrides.yaml"
    if overrides_path.is_file():
        lines = yaml.safe_load(overrides_path.read_text(encoding="utf-8"))
    else:
        lines = summary.get("overrides")
    overrides = swept_overrides(lines if isinstance(lines, list) else [])
    # Seeds count as a swept value even when the seed came from the config rather than the command line.
    if "seed" not in overrides and summary.get("seed") is not None:
        overrides["seed"] = str(summary["seed"])
    status = summary.get("status", MISSING) if not error else MISSING
    return Job(
        name=path.name,
        path=path,
        summary=summary,
        overrides=overrides,
        status=status,
        error=error or summary.get("error"),
        val_curve=read_val_curve(path / "metrics.jsonl"),
    )


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job (absent counts as a value), first seen first."""
    keys: list[str] = []
    for job in jobs:
        keys.extend(key for key in job.overrides if key not in keys)
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def choose_metric(jobs: list[Job], requested: str | None) -> str:
    """The final metric: as requested, else quant_val_bpb when any job has it, else val_bpb."""
    if requested:
        return requested
    return "quant_val_bpb" if any(job.number("quant_val_bpb") is not None for job in jobs) else "val_bpb"


def sort_jobs(jobs: list[Job], metric: str) -> list[Job]:
    """Completed jobs first, best (lowest) metric first; then the failed, diverged and missing ones."""

    def key(job: Job) -> tuple:
        ranks = [job.number(name) for name in (metric, "quant_val_bpb", "val_bpb")]
        return (
            job.status != COMPLETED,
            *[math.inf if v is None else v for v in ranks],
            natural_key(job.name),
        )

    return sorted(jobs, key=key)


@dataclass
class SeedGroup:
    label: str  # the shared values, e.g. "optimizer.matrix_lr=0.02"
    values: list[float]
    mean: float
    std: float | None
    t_test: TTest | None = None  # when a target was given and n >= 2


def seed_groups(jobs: list[Job], keys: list[str], metric: str, target: float | None) -> list[SeedGroup]:
    """Completed jobs that differ only in `seed`, grouped, with the statistics of their final metric."""
    shared_keys = [key for key in keys if key != "seed"]
    grouped: dict[tuple, list[float]] = {}
    for job in jobs:
        value = job.number(metric)
        if job.status == COMPLETED and value is not None:
            grouped.setdefault(tuple(job.overrides.get(key) for key in shared_keys), []).append(value)
    groups = []
    for shared, values in grouped.items():
        label = (
            ", ".join(f"{key}={value}" for key, value in zip(shared_keys, shared, strict=True)) or "all runs"
        )
        mean, std = mean_and_std(values)
        t_test = t_test_mean_below(values, target) if target is not None and len(values) >= 2 else None
        groups.append(SeedGroup(label, values, mean, std, t_test))
    return sorted(groups, key=lambda group: group.mean)


def format_cell(column: str, value: object) -> str:
    """A table cell for people: metrics to 4 decimals, times to 2, byte counts with separators."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if column == "artifact_bytes" and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if column == "step_avg_ms" and isinstance(value, (int, float)):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table padded into columns, so that the same text reads well in a terminal."""
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def job_columns(keys: list[str], jobs: list[Job]) -> list[str]:
    columns = ["job", *keys, *SUMMARY_COLUMNS]
    return columns + ["error"] if any(job.error for job in jobs) else columns


def job_value(job: Job, column: str) -> object:
    if column == "job":
        return job.name
    if column == "status":
        return job.status
    if column == "error":
        return job.error
    if column in SUMMARY_COLUMNS:
        return job.summary.get(column)
    return job.overrides.get(column)


def write_csv(path: Path, columns: list[str], jobs: list[Job]) -> None:
    """Full-precision values, empty cells for absent ones."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for job in jobs:
            writer.writerow(["" if (v := job_value(job, column)) is None else v for column in columns])


def groups_section(groups: list[SeedGroup], metric: str, target: float | None, alpha: float) -> str:
    headers = ["group", "n", f"mean {metric}", "std"]
    if target is not None:
        headers += ["t", "df", "p", f"beats {target} at p<{alpha}"]
    rows = []
    for group in groups:
        row = [
            group.label,
            str(len(group.values)),
            f"{group.mean:.6f}",
            "" if group.std is None else f"{group.std:.6f}",
        ]
        if target is not None:
            test = group.t_test
            if test is None:
                row += ["", "", "", "n/a (needs 2+ seeds)"]
            else:
                row += [f"{test.t:.2f}", str(test.df), f"{test.p:.4g}", "yes" if test.p < alpha else "no"]
        rows.append(row)
    return markdown_table(headers, rows)


def short_key(key: str, keys: list[str]) -> str:
    """`optimizer.matrix_lr` as `matrix_lr` when no other key ends the same way."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(other.rsplit(".", 1)[-1] == leaf for other in keys) == 1 else key


def curve_labels(jobs: list[Job], keys: list[str]) -> list[str]:
    """A legend label per job: its swept values (short), else its folder name when they do not tell
    the jobs apart (one job, or the same values in two sweeps)."""
    labels = [", ".join(f"{short_key(k, keys)}={job.overrides.get(k)}" for k in keys) for job in jobs]
    return labels if all(labels) and len(set(labels)) == len(labels) else [job.name for job in jobs]


def zoom_past_start(axis: object, curves: list[list[dict]]) -> None:
    """Fit the y-axis to the points after step 0: every run starts from the same untrained loss, and
    that one high point would flatten the part of the curves where the runs differ."""
    later = [r["val/bpb"] for curve in curves for r in curve if r.get("step", 0) > 0]
    if not later:
        return
    low = min(r["val/bpb"] for curve in curves for r in curve)
    high = max(later)
    pad = 0.08 * (high - low) or 0.05
    axis.set_ylim(low - pad, high + pad)


def plot(jobs: list[Job], keys: list[str], metric: str, path: Path) -> None:
    """val_bpb against tokens and against training time, one line per job; for a sweep over one or two
    keys (seeds aside), also the final metric against the first key (one line per value of the second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [key for key in keys if key != "seed"]
    panels = 3 if len(swept) in (1, 2) else 2
    width = 6 * panels
    figure, axes = plt.subplots(1, panels, figsize=(width, 4.5), squeeze=False)
    axes = axes[0]
    curves = []
    for job, label in zip(jobs, curve_labels(jobs, keys), strict=True):
        curve = [r for r in job.val_curve if math.isfinite(r["val/bpb"])]
        if not curve:
            continue
        curves.append(curve)
        bpb = [r["val/bpb"] for r in curve]
        (line,) = axes[0].plot([r.get("tokens", 0) for r in curve], bpb, marker=".", label=label)
        axes[1].plot(
            [r.get("train_time_ms", 0) / 1000 for r in curve], bpb, marker=".", color=line.get_color()
        )
    for axis, xlabel in zip(axes[:2], ["tokens", "training time (s)"], strict=True):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("val_bpb")
        axis.grid(alpha=0.3)
        zoom_past_start(axis, curves)
    axes[0].set_title("val_bpb vs tokens")
    axes[1].set_title("val_bpb vs training time")
    legend_rows = 0
    if curves:
        # One legend for both curve panels, below them, in as many columns as the labels allow.
        handles, labels = axes[0].get_legend_handles_labels()
        columns = max(1, min(len(labels), int(width / (0.075 * max(map(len, labels)) + 0.7))))
        legend_rows = math.ceil(len(labels) / columns)
        figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    else:
        axes[0].text(
            0.5, 0.5, "no val/bpb records in metrics.jsonl", ha="center", transform=axes[0].transAxes
        )
    if panels == 3:
        plot_final_vs_swept(axes[2], jobs, swept, metric)
    figure.tight_layout(rect=(0, min(0.06 * legend_rows + 0.01, 0.5), 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_final_vs_swept(axis: object, jobs: list[Job], swept: list[str], metric: str) -> None:
    """The final metric against swept[0]; with a second swept key, one line per value of it."""
    key, series_key = swept[0], (swept[1] if len(swept) > 1 else None)
    points = [
        (job.overrides.get(key), job.overrides.get(series_key) if series_key else None, job.number(metric))
        for job in jobs
        if job.status == COMPLETED and job.number(metric) is not None and job.overrides.get(key) is not None
    ]
    try:
        xs_of = {x: float(x) for x, _, _ in points}
    except ValueError:  # categorical values (model=small,medium): evenly spaced, in sorted order
        categories = sorted({x for x, _, _ in points}, key=natural_key)
        xs_of = {x: float(categories.index(x)) for x in categories}
        axis.set_xticks(range(len(categories)), categories, rotation=30)
    else:
        values = list(xs_of.values())
        if values and min(values) > 0 and max(values) > 10 * min(values):
            axis.set_xscale("log")
            axis.minorticks_off()
        if len(set(values)) <= 8:  # ticks at the swept values, written as on the command line
            ticks = {value: text for text, value in sorted(xs_of.items(), reverse=True)}
            axis.set_xticks(list(ticks), list(ticks.values()))
    series = sorted({s for _, s, _ in points}, key=lambda s: natural_key(str(s)))
    for name in series:
        # Several seeds per value: the dots are the runs, the line joins their means.
        by_x: dict[float, list[float]] = {}
        for x, s, y in points:
            if s == name:
                by_x.setdefault(xs_of[x], []).append(y)
        label = f"{short_key(series_key, swept)}={name}" if series_key else None
        (line,) = axis.plot(sorted(by_x), [sum(by_x[x]) / len(by_x[x]) for x in sorted(by_x)], label=label)
        dots = [(x, y) for x, ys in by_x.items() for y in ys]
        axis.scatter([x for x, _ in dots], [y for _, y in dots], alpha=0.6, color=line.get_color())
    if series_key and points:
        axis.legend(fontsize="small")
    axis.set_xlabel(key)
    axis.set_ylabel(f"final {metric}")
    axis.set_title(f"final {metric} vs {short_key(key, swept)}")
    axis.grid(alpha=0.3)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="speedrun-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders or sweep folders")
    parser.add_argument("--out", type=Path, help="where comparison.{md,csv,png} go (default: the first PATH)")
    parser.add_argument(
        "--target", type=float, help="test whether each seed group's mean metric is below this"
    )
    parser.add_argument("--alpha", type=float, default=0.01, help="significance level of the t-test (0.01)")
    parser.add_argument(
        "--metric",
        help="summary field to rank, group and test (default: quant_val_bpb if present, else val_bpb)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in args.paths:
        if not path.is_dir():
            print(
                f"speedrun-compare: {path} is not a folder; give run folders or sweep folders",
                file=sys.stderr,
            )
            return 2
    folders = find_run_folders(args.paths)
    if not folders:
        print(
            f"speedrun-compare: no run folder found in {', '.join(map(str, args.paths))} "
            "(a run folder holds summary.json, metrics.jsonl or .hydra/; a sweep folder holds run folders)",
            file=sys.stderr,
        )
        return 2
    jobs = [load_job(folder) for folder in folders]
    names = [job.name for job in jobs]
    for job in jobs:  # the same job name from two sweeps: tell them apart by their sweep folder
        if names.count(job.name) > 1:
            job.name = f"{job.path.parent.name}/{job.name}"

    keys = varying_keys(jobs)
    metric = choose_metric(jobs, args.metric)
    if not any(job.number(metric) is not None for job in jobs) and args.metric:
        print(
            f"speedrun-compare: --metric {metric}: no summary.json has a number under that name; "
            "use a summary field such as val_bpb, quant_val_bpb, val_loss or quant_val_loss",
            file=sys.stderr,
        )
        return 2
    jobs = sort_jobs(jobs, metric)
    columns = job_columns(keys, jobs)
    table = markdown_table(columns, [[format_cell(c, job_value(job, c)) for c in columns] for job in jobs])
    report = [
        f"# speedrun comparison: {len(jobs)} runs",
        "",
        f"Sorted by {metric}; runs that did not complete last.",
        "",
    ]
    report += [table, ""]
    if "seed" in keys:
        groups = seed_groups(jobs, keys, metric, args.target)
        report += [
            f"## Seed groups ({metric})",
            "",
            groups_section(groups, metric, args.target, args.alpha),
            "",
        ]
    elif args.target is not None:
        report += ["No seed groups (runs that differ only in `seed`), so no t-test against the target.", ""]

    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "comparison.csv", columns, jobs)
    plot(jobs, keys, metric, out / "comparison.png")
    text = "\n".join(report)
    (out / "comparison.md").write_text(text + "\n![curves](comparison.png)\n", encoding="utf-8")
    print(text)
    print(f"wrote comparison.md, comparison.csv, comparison.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
