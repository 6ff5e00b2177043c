"""Compare runs side by side: `python -m speedrun.compare PATH... [--target T] [--baseline B] [--reach R]`.

PATH is a run folder (it holds summary.json, metrics.jsonl, .hydra/) or a sweep folder whose subfolders are
run folders. The result is one row per job with the overrides that differ between jobs, printed and
written as comparison.md and comparison.csv, plus curves in comparison.png. Runs that differ only in
`seed` form a setting (mean, standard deviation, n); with `--target` each setting is tested against it
as records are judged, with `--baseline` (or a sweep whose swept keys are at their defaults in one
setting) every setting is compared with the baseline's, and `--reach` gives the training time and
tokens at which each run first reached a value of the metric.

scipy and matplotlib, about a second to import, are imported only where the statistics and the figure
are made, so `--help` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speedrun.callbacks import natural_key
from speedrun.cli import Parser, finite_float, fraction, positive_float

# Summary fields shown for every job, in this order, after the swept overrides.
SUMMARY_COLUMNS = ["status", "val_bpb", "quant_val_bpb", "artifact_bytes", "steps", "step_avg_ms"]
# Provenance fields that must agree for runs to be comparable (the host and the command line may differ).
PROVENANCE_MUST_MATCH = (
    "git_commit", "git_dirty", "git_diff_sha256", "speedrun_version", "python", "torch", "cuda", "nccl",
    "gpu_name", "gpu_count", "data_manifest_sha256", "data_shards", "tokenizer_sha256",
)  # fmt: skip
COMPLETED = "completed"
MISSING = "missing"
BASELINE = "baseline"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class Job:
    """One run folder as the comparison sees it."""

    name: str
    path: Path
    source: str  # the sweep folder it was found in, "" for a run folder given itself, or BASELINE
    summary: dict
    overrides: dict[str, str]  # the swept values: override key -> value as written on the command line
    defaults: dict  # its sweep's config without the swept values (multirun.yaml), {} for a single run
    status: str
    error: str | None
    curve: list[dict] = field(default_factory=list)  # metrics.jsonl records that hold the curve's metric

    def lookup(self, path: str) -> object:
        """A summary value by dotted path (`provenance.git_commit`); None when absent."""
        return dig(self.summary, *path.split("."))

    def number(self, path: str) -> float | None:
        """A finite numeric summary value, else None (absent, null, NaN in files written before
        summary.json became strict JSON)."""
        return finite(self.lookup(path))


def dig(value: object, *keys: str) -> object:
    """value[keys[0]][keys[1]]...; None where a key is missing or a level is not a mapping."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def is_run_folder(path: Path) -> bool:
    return (
        (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file() or (path / ".hydra").is_dir()
    )


def find_run_folders(path: Path) -> list[tuple[Path, Path | None]]:
    """(run folder, the sweep folder it is in or None): the path itself if it is a run folder, else its
    subfolders that are (one level down)."""
    if is_run_folder(path):
        return [(path, None)]
    subfolders = [sub for sub in path.iterdir() if sub.is_dir() and not sub.name.startswith(".")]
    runs = sorted((sub for sub in subfolders if is_run_folder(sub)), key=lambda p: natural_key(p.name))
    return [(run, path) for run in runs]


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


def read_text(path: Path) -> str | None:
    """A file's text, or None with one warning naming it when it cannot be read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
        warn(f"{path}: {reason}; left out of the comparison")
        return None


def read_yaml(path: Path) -> object:
    text = read_text(path) if path.is_file() else None
    if text is None:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        warn(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); left out of the comparison")
        return None


def read_curve(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The records of metrics.jsonl that hold a number under one of `keys`. A line cut short by a crash
    is skipped; NaN and Infinity (written by versions before strict JSON) parse and are dropped later."""
    text = read_text(path) if path.is_file() else None
    records = []
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and any(finite(record.get(key)) is not None for key in keys):
            records.append(record)
    return records


def read_curves(jobs: list[Job], key: str) -> None:
    """Each job's evaluations of `key`, and of val/bpb (the curve shown when no run traces `key`)."""
    for job in jobs:
        job.curve = read_curve(job.path / "metrics.jsonl", (key, "val/bpb"))


def load_job(path: Path, source: str, defaults: dict) -> Job:
    summary_path = path / "summary.json"
    summary: object = {}
    error = None
    if not summary_path.is_file():
        error = "no summary.json: the job died before writing it (see its train.log)"
    elif (text := read_text(summary_path)) is None:
        error = "summary.json unreadable (see the warning above)"
    else:
        try:
            summary = json.loads(text)  # Python's json also reads the NaN of files older than strict JSON
        except json.JSONDecodeError as exc:
            error = f"summary.json unreadable: {exc}"
    if not isinstance(summary, dict):
        summary, error = {}, "summary.json is not a JSON object"
    lines = read_yaml(path / ".hydra" / "overrides.yaml")
    if lines is None:
        lines = summary.get("overrides")
    overrides = swept_overrides(lines if isinstance(lines, list) else [])
    # Seeds count as a swept value even when the seed came from the config rather than the command line.
    if "seed" not in overrides and summary.get("seed") is not None:
        overrides["seed"] = str(summary["seed"])
    return Job(
        name=path.name,
        path=path,
        source=source,
        summary=summary,
        overrides=overrides,
        defaults=defaults,
        status=str(summary.get("status", MISSING)) if not error else MISSING,
        error=error or summary.get("error"),
    )


def load_jobs(paths: list[Path], baseline_paths: list[Path]) -> list[Job]:
    """Every run folder under `paths` and `baseline_paths`, once; the latter's runs are the baseline."""
    found = {}  # run folder -> (its sweep folder or None, whether it is a baseline run)
    for is_baseline, roots in ((True, baseline_paths), (False, paths)):
        for root in roots:
            for folder, sweep in find_run_folders(root):
                found.setdefault(folder.resolve(), (folder, sweep, is_baseline))
    jobs = []
    sweep_defaults: dict[Path, dict] = {}
    for folder, sweep, is_baseline in found.values():
        if sweep is not None and sweep not in sweep_defaults:
            config = read_yaml(sweep / "multirun.yaml")
            sweep_defaults[sweep] = config if isinstance(config, dict) else {}
        source = BASELINE if is_baseline else (sweep.name if sweep else "")
        jobs.append(load_job(folder, source, sweep_defaults.get(sweep, {})))
    names = [job.name for job in jobs]
    for job in jobs:  # the same job name from two sweeps: tell them apart by their sweep folder
        if names.count(job.name) > 1:
            job.name = f"{job.path.parent.name}/{job.name}"
    return jobs


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


def curve_key(metric: str) -> str:
    """The metrics.jsonl key that traces `metric` during training: val_loss -> val/loss. The quantised
    metrics are measured once, at the end, so their curve is the unquantised metric's."""
    return metric.removeprefix("quant_").replace("_", "/", 1)


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


@dataclass(frozen=True)
class Reached:
    """Where a curve first reached a target, interpolated between the two evaluations around it."""

    seconds: float
    tokens: float


def first_reach(curve: list[dict], key: str, target: float) -> Reached | None:
    """The first point where the curve of `key` is at or below `target`, or None if it never is.

    Evaluations are points; between two of them the metric is taken to change linearly in training time
    and in tokens, so the crossing lies the same fraction of the way in both.
    """
    previous = None
    for record in curve:
        value = finite(record.get(key))
        if value is None:
            continue
        seconds, tokens = record.get("train_time_ms", 0) / 1000, float(record.get("tokens", 0))
        if value <= target:
            if previous is None:
                return Reached(seconds, tokens)
            value0, seconds0, tokens0 = previous
            fraction = (value0 - target) / (value0 - value)
            return Reached(
                seconds0 + fraction * (seconds - seconds0), tokens0 + fraction * (tokens - tokens0)
            )
        previous = (value, seconds, tokens)
    return None


@dataclass
class Setting:
    """The completed runs that share every swept value but the seed (and, when runs come from several
    sweep folders, the folder), with their final metric."""

    label: str
    values: dict[str, str | None]  # key -> value for the swept keys other than seed
    source: str
    jobs: list[Job]
    metric_values: list[float]

    @property
    def seeds(self) -> list[str | None]:
        return [job.overrides.get("seed") for job in self.jobs]


def settings_of(jobs: list[Job], keys: list[str], metric: str) -> list[Setting]:
    """Completed jobs with a final metric, grouped into settings; best mean first."""
    shared_keys = [key for key in keys if key != "seed"]
    several_sources = len({job.source for job in jobs}) > 1
    grouped: dict[tuple, Setting] = {}
    for job in jobs:
        value = job.number(metric)
        if job.status != COMPLETED or value is None:
            continue
        values = {key: job.overrides.get(key) for key in shared_keys}
        source = job.source if several_sources else ""
        if (source, *values.values()) not in grouped:
            label = ", ".join(
                f"{key}={'default' if value is None else value}" for key, value in values.items()
            )
            label = ": ".join(part for part in (source or None, label or None) if part) or "all runs"
            grouped[(source, *values.values())] = Setting(label, values, source, [], [])
        grouped[(source, *values.values())].jobs.append(job)
        grouped[(source, *values.values())].metric_values.append(value)
    return sorted(grouped.values(), key=lambda setting: statistics.fmean(setting.metric_values))


def at_default(job: Job, key: str) -> bool:
    """Whether the job ran with the key's default: not overridden, or overridden with the value its sweep
    has without the swept values (multirun.yaml holds that config; group choices such as `model` are
    under hydra.runtime.choices), unless that value came from the sweep's own command line."""
    value = job.overrides.get(key)
    if value is None:
        return True
    command_line = dig(job.defaults, "hydra", "overrides", "task")
    if isinstance(command_line, list) and swept_overrides(command_line).get(key) == value:
        return False  # set for the whole sweep on its command line: multirun.yaml holds it, not the default
    choices = dig(job.defaults, "hydra", "runtime", "choices")
    default = (
        choices[key] if isinstance(choices, dict) and key in choices else dig(job.defaults, *key.split("."))
    )
    if default is None or isinstance(default, (dict, list)):
        return False  # unknown: not in the sweep's config, or not a single value
    try:
        return yaml.safe_load(value) == default or value == str(default)
    except yaml.YAMLError:
        return value == str(default)


class UsageError(Exception):
    """A problem with the command line, reported as one `error:` line."""


def choose_baseline(settings: list[Setting], by_path: bool, selectors: list[str]) -> Setting | None:
    """The baseline setting: the runs under --baseline PATH (`by_path`), the one setting matching every
    --baseline KEY=VALUE, or else the one setting whose swept keys are all at their defaults (None if
    there is not exactly one)."""
    if by_path:
        matches = [setting for setting in settings if setting.source == BASELINE]
        if not matches:
            raise UsageError("--baseline: no run in the baseline folder completed with a final metric")
        if len(matches) > 1:
            raise UsageError(
                f"--baseline: the runs in the baseline folder form {len(matches)} settings "
                f"({'; '.join(s.label for s in matches)}); give a folder whose runs differ only in seed"
            )
        return matches[0]
    if selectors:
        pairs = [selector.split("=", 1) for selector in selectors]
        matches = [s for s in settings if all(s.values.get(key) == value for key, value in pairs)]
        if len(matches) != 1:
            known = "; ".join(setting.label for setting in settings) or "none"
            found = "no setting" if not matches else f"{len(matches)} settings"
            raise UsageError(
                f"--baseline {' '.join(selectors)}: {found} of the completed runs match; "
                f"give KEY=VALUE pairs that pick one of: {known}"
            )
        return matches[0]
    matches = [s for s in settings if all(at_default(job, key) for job in s.jobs for key in s.values)]
    return matches[0] if len(matches) == 1 and len(settings) > 1 else None


def format_cell(column: str, value: object) -> str:
    """A table cell for people: metrics to 4 decimals, times to 2, byte counts with separators."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, separators=(",", ":"))
    elif column.endswith("_bytes") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{int(value):,}"
    elif column.endswith("_ms") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}"
    elif isinstance(value, float):
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


def rules_verdict(job: Job) -> str | None:
    """`pass`, or `fail: <failed checks>`, from the summary's rules block; None without one."""
    rules = job.summary.get("rules")
    if not isinstance(rules, dict):
        return None
    if rules.get("pass"):
        return "pass"
    checks = rules.get("checks") if isinstance(rules.get("checks"), list) else []
    failed = [str(c.get("name")) for c in checks if isinstance(c, dict) and not c.get("pass")]
    return "fail: " + ", ".join(failed) if failed else "fail"


@dataclass
class Table:
    """The per-job table: which columns, and how to get each cell."""

    keys: list[str]
    extra: list[str]  # summary fields asked for with --columns
    rules: bool
    reach: float | None
    reach_key: str
    errors: bool

    @property
    def columns(self) -> list[str]:
        columns = ["job", *self.keys, "status", *(["rules"] if self.rules else []), *SUMMARY_COLUMNS[1:]]
        columns += [column for column in self.extra if column not in columns]
        if self.reach is not None:
            columns += [f"time_to_{self.reach}_s", f"tokens_to_{self.reach}"]
        return columns + ["error"] if self.errors else columns

    def value(self, job: Job, column: str) -> object:
        if column == "job":
            return job.name
        if column == "status":
            return job.status
        if column == "error":
            return job.error
        if column == "rules":
            return rules_verdict(job)
        if self.reach is not None and column.startswith(("time_to_", "tokens_to_")):
            reached = first_reach(job.curve, self.reach_key, self.reach)
            if reached is None:
                return None
            return round(reached.seconds, 3) if column.startswith("time_to_") else round(reached.tokens)
        if column in self.keys:
            return job.overrides.get(column)
        return job.lookup(column)


def write_csv(path: Path, table: Table, jobs: list[Job]) -> None:
    """Full-precision values, empty cells for absent ones."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(table.columns)
        for job in jobs:
            row = []
            for column in table.columns:
                value = table.value(job, column)
                row.append(
                    "" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value
                )
            writer.writerow(row)


def provenance_warnings(jobs: list[Job]) -> list[str]:
    """One line per provenance field whose value is not the same in every run that records provenance."""
    recorded = [job for job in jobs if isinstance(job.summary.get("provenance"), dict)]
    lines = []
    for name in PROVENANCE_MUST_MATCH:
        holders: dict[str, list[str]] = {}
        for job in recorded:
            holders.setdefault(json.dumps(job.summary["provenance"].get(name)), []).append(job.name)
        if len(holders) > 1:
            parts = [
                f"{value} ({', '.join(names)})" if len(names) <= 3 else f"{value} ({len(names)} runs)"
                for value, names in sorted(holders.items(), key=lambda item: -len(item[1]))
            ]
            lines.append(f"the runs differ in provenance.{name}: {'; '.join(parts)}")
    return lines


def signed(value: float, digits: int = 6) -> str:
    return f"{value:+.{digits}f}"


def seeds_text(seeds: int | None) -> str:
    return "∞" if seeds is None else str(seeds)


def settings_section(settings: list[Setting], metric: str, args: argparse.Namespace) -> str:
    """Mean, standard deviation and n per setting; with --target, the one-sided test of "the mean is
    below target - margin" and the seeds that test needs at the setting's spread."""
    from speedrun import stats  # scipy: see the module docstring

    threshold = None if args.target is None else args.target - args.margin
    headers = ["setting", "n", f"mean {metric}", "std"]
    if threshold is not None:
        headers += ["t", "df", "p", f"< {threshold:.8g} at p<{args.alpha}", "seeds needed"]
    rows = []
    for setting in settings:
        values = setting.metric_values
        std = statistics.stdev(values) if len(values) > 1 else None
        row = [
            setting.label,
            str(len(values)),
            f"{statistics.fmean(values):.6f}",
            "" if std is None else f"{std:.6f}",
        ]
        if threshold is not None and std is None:
            row += ["", "", "", "n/a (needs 2+ seeds)", ""]
        elif threshold is not None:
            test = stats.one_sample_below(values, threshold, confidence=1 - args.alpha)
            effect = args.effect if args.effect is not None else threshold - test.estimate
            seeds = stats.seeds_needed(effect, std, args.alpha, args.power, samples=1)
            verdict = "yes" if test.p < args.alpha else "no"
            row += [f"{test.t:.2f}", f"{test.df:g}", f"{test.p:.4g}", verdict, seeds_text(seeds)]
        rows.append(row)
    text = markdown_table(headers, rows)
    if threshold is not None:
        margin = f" = {args.target} - margin {args.margin}" if args.margin else ""
        effect = f"a mean {args.effect} below it" if args.effect is not None else "the observed mean"
        text += (
            f"\n\nOne-sided one-sample t-test of mean < {threshold:.8g}{margin} (t < 0 when below). "
            f"Seeds needed: for {args.power:.0%} power to show {effect} below it at p < {args.alpha}, "
            "at the setting's standard deviation (∞: not below, or out of reach)."
        )
    return text


def baseline_section(
    settings: list[Setting], baseline: Setting, metric: str, args: argparse.Namespace
) -> str:
    """Each other setting's mean difference from the baseline (Δ = setting - baseline) with its confidence
    interval, Welch's test, the paired test over the seeds both ran, and the seeds per setting needed to
    detect that Δ at the observed spread."""
    from speedrun import stats  # scipy: see the module docstring

    confidence = 1 - args.alpha
    side = {"two-sided": "Δ ≠ 0", "less": "Δ < 0", "greater": "Δ > 0"}[args.alternative]
    headers = ["setting", "n", f"mean {metric}", "Δ", f"{confidence:.0%} CI of Δ", "Welch t", "df", "p"]
    headers += ["paired n", "paired p", "seeds needed"]
    rows = []
    for setting in settings:
        if setting is baseline:
            continue
        values, base = setting.metric_values, baseline.metric_values
        row = [setting.label, str(len(values)), f"{statistics.fmean(values):.6f}"]
        if len(values) < 2 or len(base) < 2:
            delta = statistics.fmean(values) - statistics.fmean(base)
            rows.append(row + [signed(delta), "n/a (needs 2+ seeds on each side)", "", "", "", "", "", ""])
            continue
        test = stats.welch(values, base, args.alternative, confidence)
        row += [signed(test.estimate), f"[{signed(test.low)}, {signed(test.high)}]"]
        row += [f"{test.t:.2f}", f"{test.df:.1f}", f"{test.p:.4g}"]
        pairs = paired_values(setting, baseline)
        if pairs:
            pair_test = stats.paired(
                [c for c, _ in pairs], [b for _, b in pairs], args.alternative, confidence
            )
            row += [str(pair_test.n), f"{pair_test.p:.4g}"]
        else:
            row += ["", ""]
        # Planning assumes equal spread: the root mean square of the two standard deviations.
        spread = math.sqrt((statistics.variance(values) + statistics.variance(base)) / 2)
        if args.effect is not None:
            effect = args.effect
        else:  # the observed Δ, in the direction the test asks about
            effect = {"two-sided": abs(test.estimate), "less": -test.estimate, "greater": test.estimate}
            effect = effect[args.alternative]
        seeds = stats.seeds_needed(
            effect, spread, args.alpha, args.power, samples=2, two_sided=args.alternative == "two-sided"
        )
        rows.append(row + [seeds_text(seeds)])
    mean = statistics.fmean(baseline.metric_values)
    effect = f"Δ = {args.effect}" if args.effect is not None else "the observed Δ"
    name = baseline.label
    if baseline.source == BASELINE:  # its label starts with the source, "baseline"
        values = name.removeprefix(BASELINE).removeprefix(": ")
        name = "the runs given with --baseline" + (f" ({values})" if values else "")
    return (
        f"Baseline: {name} (n={len(baseline.metric_values)}, mean {mean:.6f}).\n\n"
        + markdown_table(headers, rows)
        + f"\n\nΔ = setting - baseline (negative: lower {metric}). p: Welch's t-test of {side} "
        f"(--alternative {args.alternative}); the interval has the same confidence and sides, so it "
        f"excludes 0 exactly when p < {args.alpha}. Paired: the same test over the seeds both ran. "
        f"Seeds needed: per setting, for {args.power:.0%} power to detect {effect} at p < {args.alpha}, "
        "at the two settings' pooled spread."
    )


def paired_values(setting: Setting, baseline: Setting) -> list[tuple[float, float]]:
    """(setting, baseline) values of the seeds both ran, when there are 2+ and no seed ran twice."""
    mine, theirs = setting.seeds, baseline.seeds
    if None in mine or None in theirs or len(set(mine)) < len(mine) or len(set(theirs)) < len(theirs):
        return []
    by_seed = dict(zip(theirs, baseline.metric_values, strict=True))
    pairs = [
        (value, by_seed[seed])
        for seed, value in zip(mine, setting.metric_values, strict=True)
        if seed in by_seed
    ]
    return pairs if len(pairs) >= 2 else []


def reach_section(settings: list[Setting], key: str, target: float) -> str:
    """Per setting: how many runs reached the target, and their mean time and tokens to it."""
    rows = []
    for setting in settings:
        reached = [r for job in setting.jobs if (r := first_reach(job.curve, key, target)) is not None]
        row = [setting.label, f"{len(reached)}/{len(setting.jobs)}"]
        for values in ([r.seconds for r in reached], [r.tokens for r in reached]):
            if not values:
                row.append("")
                continue
            spread = f" ± {statistics.stdev(values):.4g}" if len(values) > 1 else ""
            row.append(f"{statistics.fmean(values):.4g}{spread}")
        rows.append(row)
    headers = ["setting", "reached", "training time (s)", "tokens"]
    return (
        markdown_table(headers, rows)
        + f"\n\nFirst evaluation at which {key} <= {target}, interpolated linearly between it and the one "
        "before; mean ± standard deviation over the runs that reached it."
    )


def curve_labels(jobs: list[Job], keys: list[str]) -> list[str]:
    """A legend label per job: its differing overrides (short keys; `default` where a run did not set
    one), prefixed by the sweep folder when runs come from several; else its name when these do not tell
    the jobs apart."""
    several_sources = len({job.source for job in jobs}) > 1
    labels = []
    for job in jobs:
        label = ", ".join(f"{short_key(key, keys)}={job.overrides.get(key, 'default')}" for key in keys)
        labels.append(f"{job.source}: {label}" if several_sources and job.source else label)
    return labels if all(labels) and len(set(labels)) == len(labels) else [job.name for job in jobs]


def short_key(key: str, keys: list[str]) -> str:
    """`optimizer.matrix_lr` as `matrix_lr` when no other key ends the same way."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(other.rsplit(".", 1)[-1] == leaf for other in keys) == 1 else key


def figure_of(jobs: list[Job], keys: list[str], metric: str, key: str, reach: float | None):
    """The figure of comparison.png (speedrun.plot), from the jobs' curves of `key` and final `metric`."""
    from speedrun.plot import Curve, FinalPanel, FinalPoint, assign_styles, comparison_figure  # matplotlib

    curves = []
    for job, label in zip(jobs, curve_labels(jobs, keys), strict=True):
        points = [r for r in job.curve if finite(r.get(key)) is not None]
        curves.append(
            Curve(
                label,
                tokens=[float(r.get("tokens", 0)) for r in points],
                seconds=[r.get("train_time_ms", 0) / 1000 for r in points],
                values=[float(r[key]) for r in points],
            )
        )
    styles = assign_styles(keys, [tuple(job.overrides.get(k) for k in keys) for job in jobs])
    swept = [k for k in keys if k != "seed"]
    final = None
    if len(swept) in (1, 2):
        x_key, series_key = swept[0], (swept[1] if len(swept) > 1 else None)
        points = [
            FinalPoint(job.overrides[x_key], job.overrides.get(series_key) if series_key else None, value)
            for job in jobs
            if job.status == COMPLETED
            and (value := job.number(metric)) is not None
            and x_key in job.overrides
        ]
        final = FinalPanel(
            points, short_key(x_key, swept), series_key and short_key(series_key, swept), metric
        )
    return comparison_figure(curves, styles, key.replace("/", "_"), final=final, reach=reach)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="speedrun-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders or sweep folders")
    parser.add_argument("--out", type=Path, help="where comparison.{md,csv,png} go (default: the first PATH)")
    parser.add_argument(
        "--metric",
        help="summary field to rank, group and test (default: quant_val_bpb if present, else val_bpb); its "
        "curve in metrics.jsonl (val_loss: val/loss) is plotted and used by --reach",
    )
    parser.add_argument(
        "--target", type=finite_float, help="test whether each setting's mean metric is below this"
    )
    parser.add_argument(
        "--margin",
        type=finite_float,
        default=0.0,
        help="test against target - margin (parameter-golf: SOTA - 0.005); default 0",
    )
    parser.add_argument("--alpha", type=fraction, default=0.01, help="significance level of the tests (0.01)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="PATH|KEY=VALUE",
        help="the baseline setting: a run or sweep folder, or KEY=VALUE (repeatable) picking one setting; "
        "default: the setting whose swept keys are all at their defaults",
    )
    parser.add_argument(
        "--alternative",
        choices=["two-sided", "less", "greater"],
        default="two-sided",
        help="what the tests against the baseline ask: Δ ≠ 0 (default), Δ < 0 (lower than the baseline), Δ > 0",
    )
    parser.add_argument(
        "--effect",
        type=positive_float,
        help="the difference to plan for in 'seeds needed' (default: the observed one)",
    )
    parser.add_argument(
        "--power", type=fraction, default=0.8, help="the power 'seeds needed' plans for (0.8)"
    )
    parser.add_argument(
        "--reach",
        type=finite_float,
        metavar="VALUE",
        help="report the training time and tokens at which each run's metric first reached VALUE",
    )
    parser.add_argument(
        "--columns",
        type=lambda text: [c for c in text.split(",") if c],
        default=[],
        help="more summary fields as columns, comma-separated; dotted paths reach into blocks "
        "(provenance.git_commit,params)",
    )
    return parser


def split_baseline(values: list[str]) -> tuple[list[Path], list[str]]:
    """--baseline values: folders, or KEY=VALUE selectors (not both)."""
    paths, selectors = [], []
    for value in values:
        if Path(value).is_dir():
            paths.append(Path(value))
        elif "=" in value and not value.startswith("="):
            selectors.append(value)
        else:
            raise UsageError(
                f"--baseline {value}: neither a folder nor KEY=VALUE; give a run or sweep folder, "
                "or a swept key and the value of the baseline setting"
            )
    if paths and selectors:
        raise UsageError("--baseline: give folders or KEY=VALUE pairs, not both")
    return paths, selectors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return compare(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def compare(args: argparse.Namespace) -> int:
    for path in args.paths:
        if not path.is_dir():
            raise UsageError(f"{path} is not a folder; give run folders or sweep folders")
    baseline_paths, selectors = split_baseline(args.baseline)
    jobs = load_jobs(args.paths, baseline_paths)
    if not jobs:
        raise UsageError(
            f"no run folder found in {', '.join(map(str, args.paths))} "
            "(a run folder holds summary.json, metrics.jsonl or .hydra/; a sweep folder holds run folders)"
        )
    metric = choose_metric(jobs, args.metric)
    if args.metric and not any(job.number(metric) is not None for job in jobs):
        raise UsageError(
            f"--metric {metric}: no summary.json has a number under that name; "
            "use a summary field such as val_bpb, quant_val_bpb, val_loss or quant_val_loss"
        )
    for column in args.columns:
        if all(job.lookup(column) is None for job in jobs):
            raise UsageError(
                f"--columns {column}: no summary.json has that field; use a summary field "
                "(dotted for nested blocks: provenance.git_commit)"
            )
    key = curve_key(metric)
    read_curves(jobs, key)
    if not any(finite(record.get(key)) is not None for job in jobs for record in job.curve):
        if args.reach is not None:
            raise UsageError(
                f"--reach needs the curve of {metric} ({key} in metrics.jsonl), and no run has it; "
                "choose a --metric that is evaluated during training, e.g. val_loss or val_bpb"
            )
        key = "val/bpb"  # e.g. --metric tok_per_sec: show the validation curves

    keys = varying_keys(jobs)
    jobs = sort_jobs(jobs, metric)
    settings = settings_of(jobs, keys, metric)
    baseline = choose_baseline(settings, bool(baseline_paths), selectors)
    warnings = provenance_warnings(jobs)
    for line in warnings:
        warn(line)

    table = Table(
        keys=keys,
        extra=args.columns,
        rules=any(isinstance(job.summary.get("rules"), dict) for job in jobs),
        reach=args.reach,
        reach_key=key,
        errors=any(job.error for job in jobs),
    )
    cells = [[format_cell(column, table.value(job, column)) for column in table.columns] for job in jobs]
    report = [
        f"# speedrun comparison: {len(jobs)} runs",
        "",
        f"Sorted by {metric}; runs that did not complete last.",
        "",
    ]
    report += [markdown_table(table.columns, cells), ""]
    if warnings:
        report += ["Warnings:", "", *(f"- {line}" for line in warnings), ""]
    if any(len(s.metric_values) > 1 for s in settings) or args.target is not None:
        report += [f"## Settings ({metric})", "", settings_section(settings, metric, args), ""]
    if baseline is not None and len(settings) > 1:
        report += [
            f"## Against the baseline ({metric})",
            "",
            baseline_section(settings, baseline, metric, args),
            "",
        ]
    elif len(settings) > 1 and any(len(s.metric_values) > 1 for s in settings):
        report += [
            "No baseline setting (name one with --baseline KEY=VALUE or --baseline PATH for Δ and its tests).",
            "",
        ]
    if args.reach is not None:
        report += [
            f"## Time to {key} <= {args.reach}",
            "",
            reach_section(settings, key, args.reach),
            "",
        ]

    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "comparison.csv", table, jobs)
    from speedrun.plot import save_figure  # matplotlib: see the module docstring

    save_figure(figure_of(jobs, keys, metric, key, args.reach), out / "comparison.png")
    text = "\n".join(report)
    (out / "comparison.md").write_text(text + "\n![curves](comparison.png)\n", encoding="utf-8")
    print(text)
    print(f"wrote comparison.md, comparison.csv, comparison.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
