"""Where training events go: the console, `metrics.jsonl` and the configured logger, behind one `Sink`
interface.

The `logger` config group picks one more sink (`logger=wandb`, or `logger=none` for none): a partial
whose `_target_` is any `Sink` class, completed with `run_dir`, `config` (the resolved config) and
`run_info` (who the run is within a sweep). A CSV or TensorBoard logger is one such class plus one YAML.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from speedrun.sinks.base import MultiSink, Sink
from speedrun.sinks.console import ConsoleSink
from speedrun.sinks.jsonl import JsonlSink
from speedrun.sinks.wandb_sink import WandbSink

__all__ = ["ConsoleSink", "JsonlSink", "MultiSink", "Sink", "WandbSink", "build_sinks"]


def build_sinks(
    *,
    logger_factory: Callable[..., Sink] | None,
    run_dir: Path,
    config: dict,
    run_info: dict,
    is_rank0: bool,
    total_steps: int | None,
    max_wallclock_ms: float | None,
    tokens_per_step: int | None,
    log: logging.Logger,
) -> MultiSink:
    """The sinks of one run: console and `run_dir/metrics.jsonl` always, plus the configured logger.

    Only rank 0 logs; other ranks get an empty MultiSink.
    """
    if not is_rank0:
        return MultiSink()
    sinks: list[Sink] = [
        ConsoleSink(total_steps, log, max_wallclock_ms=max_wallclock_ms, tokens_per_step=tokens_per_step),
        JsonlSink(Path(run_dir) / "metrics.jsonl"),
    ]
    if logger_factory is not None:
        sinks.append(logger_factory(run_dir=Path(run_dir), config=config, run_info=run_info))
    return MultiSink(sinks)
