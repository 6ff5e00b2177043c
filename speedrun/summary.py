"""summary.json: the one record of how a run ended, written atomically whatever the outcome."""

from __future__ import annotations

import json
import os
from pathlib import Path

SUMMARY_FIELDS = (
    "status", "val_loss", "val_bpb", "quant_val_loss", "quant_val_bpb", "model_bytes", "code_bytes",
    "artifact_bytes", "params", "steps", "tokens_seen", "train_time_ms", "step_avg_ms", "tok_per_sec",
    "mfu", "peak_mem_mib", "world_size", "seed", "overrides", "error",
)  # fmt: skip


def error_message(exc: BaseException) -> str:
    """summary.json's `error` for an exception: its type and first line, so that tables and sweep
    reports stay one line per job (the whole traceback is in train.log)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def write_summary(run_dir: str | os.PathLike, values: dict) -> Path:
    """Write every DESIGN field (null when unknown) plus any extras, via a temporary file + rename."""
    path = Path(run_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {key: values.get(key) for key in SUMMARY_FIELDS}
    record.update({k: v for k, v in values.items() if k not in record})
    tmp = path.with_name(f".summary.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
