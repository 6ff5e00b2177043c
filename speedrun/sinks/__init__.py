"""Where training events go: the console, `metrics.jsonl` and wandb, behind one `Sink` interface."""

from __future__ import annotations

import logging
from pathlib import Path

from speedrun.sinks.base import MultiSink, Sink
from speedrun.sinks.console import ConsoleSink
from speedrun.sinks.jsonl import JsonlSink
from speedrun.sinks.wandb_sink import WandbSink

__all__ = ["ConsoleSink", "JsonlSink", "MultiSink", "Sink", "WandbSink", "build_sinks"]

LOGGER_KINDS = ("wandb", "none")


def build_sinks(
    *,
    logger_cfg: dict,
    run_dir: Path,
    config: dict,
    run_info: dict,
    is_rank0: bool,
    total_steps: int | None,
    max_wallclock_ms: float | None,
    log: logging.Logger,
) -> MultiSink:
    """The sinks of one run: console and `run_dir/metrics.jsonl` always, wandb when `logger.kind=wandb`.

    Only rank 0 logs; other ranks get an empty MultiSink. `run_info` names the run in wandb:
    group = the sweep folder (None for a single run), job_type = the sweep preset, name = the job.
    """
    if not is_rank0:
        return MultiSink()
    kind = logger_cfg.get("kind", "none")
    if kind not in LOGGER_KINDS:
        raise ValueError(
            f"logger.kind={kind!r} is not one of {LOGGER_KINDS}; pick logger=wandb or logger=none"
        )
    sinks: list[Sink] = [
        ConsoleSink(total_steps, log, max_wallclock_ms=max_wallclock_ms),
        JsonlSink(Path(run_dir) / "metrics.jsonl"),
    ]
    if kind == "wandb" and logger_cfg.get("mode", "offline") != "disabled":
        sinks.append(
            WandbSink(
                project=logger_cfg.get("project", "speedrun"),
                entity=logger_cfg.get("entity"),
                mode=logger_cfg.get("mode", "offline"),
                run_dir=Path(run_dir),
                group=run_info.get("sweep_dir_name"),
                job_type=run_info.get("sweep_preset"),
                name=run_info.get("job_name"),
                tags=list(logger_cfg.get("tags") or []),
                config=config,
                notes=logger_cfg.get("notes"),
            )
        )
    return MultiSink(sinks)
