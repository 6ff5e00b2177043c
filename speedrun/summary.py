"""summary.json: the one record of how a run ended. This module alone writes it.

Written atomically (temporary file, rename) whatever the outcome, as strict JSON: a non-finite number
is written as null, and `nonfinite` says which fields were NaN or infinite.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SUMMARY_FIELDS = (
    "status", "val_loss", "val_bpb", "quant_val_loss", "quant_val_bpb", "model_bytes", "code_bytes",
    "artifact_bytes", "params", "steps", "tokens_seen", "train_time_ms", "step_avg_ms", "tok_per_sec",
    "mfu", "peak_mem_mib", "world_size", "seed", "overrides", "error",
)  # fmt: skip


# Errors whose message already says everything (speedrun's own, and the file and value errors it
# raises on purpose): their type name would only add noise to the one line.
SELF_EXPLAINING = ("ConfigError", "DataError", "CheckpointError", "ArtifactError", "Refused", "RunFolderBusy",
                   "ShardError", "TokenizerError")  # fmt: skip
# Lines of OmegaConf/Hydra messages that locate a key in their own terms; the one line keeps the reason.
_LOCATOR_PREFIXES = ("full_key:", "object_type=", "reference_type=")


def _unwrapped(exc: BaseException) -> BaseException:
    """Hydra wraps an error raised while building a component in an InstantiationException whose message
    names only the target; the error it wraps is the one meant for the user. (Matched by name: importing
    hydra here would cost every reader of summaries 0.15 s.)"""
    while type(exc).__name__ == "InstantiationException" and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def one_line(exc: BaseException) -> str:
    """A user's error as one line: Hydra's wrapped errors give their cause, multi-line messages are joined."""
    exc = _unwrapped(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_LOCATOR_PREFIXES)]
    return " ".join(lines).replace(".. ", ". ")


def error_message(exc: BaseException) -> str:
    """summary.json's `error` for an exception: its type and message on one line, so that tables and
    sweep reports stay one line per job (the whole traceback is in train.log)."""
    name = type(_unwrapped(exc)).__name__
    text = one_line(exc)
    return text if name in SELF_EXPLAINING else f"{name}: {text}".rstrip(": ")


def finite_only(value: object, path: str = "", nonfinite: dict[str, str] | None = None) -> object:
    """`value` with every NaN / infinite float replaced by None; their dotted paths go to `nonfinite`
    (e.g. {"quant_val_bpb": "nan"}), so strict JSON keeps the reason."""
    if isinstance(value, float) and not math.isfinite(value):
        if nonfinite is not None:
            nonfinite[path] = str(value)
        return None
    if isinstance(value, dict):
        return {k: finite_only(v, f"{path}.{k}" if path else str(k), nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v, f"{path}[{i}]", nonfinite) for i, v in enumerate(value)]
    return value


def write_summary(run_dir: str | os.PathLike, values: dict) -> Path:
    """Write every DESIGN field (null when unknown) plus any extras, via a temporary file + rename."""
    path = Path(run_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {key: values.get(key) for key in SUMMARY_FIELDS}
    record.update({k: v for k, v in values.items() if k not in record and k != "nonfinite"})
    nonfinite: dict[str, str] = {}
    record = finite_only(record, nonfinite=nonfinite)
    if nonfinite:
        record["nonfinite"] = nonfinite
    tmp = path.with_name(f".summary.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def record_end(run_dir: Path, summary: dict, *, seed: int, overrides: list[str]) -> dict:
    """Rank 0's record of how the job ended, with who it was; returns what was written."""
    record = {**summary, "seed": seed, "overrides": overrides}
    record.setdefault("error", None)
    write_summary(run_dir, record)
    return record


def record_early_end(
    run_dir: Path,
    status: str,
    error: str,
    *,
    seed: int,
    overrides: list[str],
    replace: bool = False,
    fresh: bool = False,
) -> None:
    """The record of a job that ended before rank 0 could write one (keeping rank 0's if it did,
    unless `replace`: then its status and error are overwritten, its measurements kept). Rank 0's
    `interrupted` always stands: all ranks agreed on that stop, so none of them had crashed.
    `fresh`: the attempt ended before training, in a folder where none trained before, so whatever
    summary is there is an earlier failed attempt's, which this one's record replaces."""
    existing = None if fresh else read_summary(run_dir)
    status_written = existing.get("status") if existing else None
    if status_written not in (None, "running") and (not replace or status_written == "interrupted"):
        return
    write_summary(
        run_dir, {**(existing or {}), "status": status, "error": error, "seed": seed, "overrides": overrides}
    )
