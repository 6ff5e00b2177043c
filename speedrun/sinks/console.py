"""Human-readable progress: one line per training log step, one per evaluation.

In a terminal the training lines redraw a single progress line (`\\r`) instead of scrolling; evaluation
lines still print. Everything goes through the given logger, so the file handler the entry point installs
(train.log) gets every line either way.
"""

from __future__ import annotations

import logging
import shutil
import sys
from typing import TextIO

from speedrun.sinks.base import Sink

# Set on log records that the terminal shows as the progress line rather than as a scrolling line.
PROGRESS_ATTR = "speedrun_progress"


def format_duration(seconds: float) -> str:
    """45s, 1m12s, 2h03m: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(per_second: float) -> str:
    """1.23M, 850.2K, 512: tokens per second at a glance."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}K"
    return f"{per_second:.0f}"


def eta_seconds(record: dict, total_steps: int | None, max_wallclock_ms: float | None) -> float | None:
    """Time left until whichever limit ends the run first: the step budget or the wallclock budget."""
    remaining_ms = []
    step_ms = record.get("step_ms")
    if total_steps and step_ms is not None:
        remaining_ms.append((total_steps - record["step"]) * step_ms)
    if max_wallclock_ms:
        remaining_ms.append(max_wallclock_ms - record["train_time_ms"])
    return max(0.0, min(remaining_ms)) / 1000 if remaining_ms else None


def format_train_line(record: dict, total_steps: int | None, max_wallclock_ms: float | None) -> str:
    """`step 120/2000 | loss 3.2140 | 41.2 ms/step | 1.23M tok/s | eta 1m12s` (absent values left out)."""
    parts = [f"step {record['step']}/{total_steps}" if total_steps else f"step {record['step']}"]
    if record.get("train/loss") is not None:
        parts.append(f"loss {record['train/loss']:.4f}")
    if record.get("step_ms") is not None:
        parts.append(f"{record['step_ms']:.1f} ms/step")
    if record.get("train/tok_per_sec") is not None:
        parts.append(f"{format_rate(record['train/tok_per_sec'])} tok/s")
    eta = eta_seconds(record, total_steps, max_wallclock_ms)
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)


def format_eval_line(record: dict) -> str:
    """`step 120 | val_loss 3.1000 | val_bpb 1.8000`, and likewise for the quantized round-trip."""
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key.startswith(("val/", "quant/")) and value is not None:
            parts.append(f"{key.replace('/', '_')} {value:.4f}")
    return " | ".join(parts)


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _TerminalFilter(logging.Filter):
    """On handlers that write to a terminal: drop the progress copies (the bar shows them) and end the
    bar's line before any other message, so that the message does not land after the bar."""

    def __init__(self, sink: ConsoleSink) -> None:
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, PROGRESS_ATTR, False):
            return False
        self.sink.end_progress_line()
        return True


class ConsoleSink(Sink):
    """Prints training and evaluation lines through `logger`; a live progress line when `stream` is a TTY.

    `total_steps` and `max_wallclock_ms` (None or 0: no such limit) give the ETA.
    """

    def __init__(
        self,
        total_steps: int | None,
        logger: logging.Logger,
        max_wallclock_ms: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total_steps = total_steps or None
        self.max_wallclock_ms = max_wallclock_ms or None
        self.logger = logger
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _is_terminal(self.stream)
        self._progress_shown = False
        self._filtered_handlers: list[logging.Handler] = []
        if self.interactive:
            self._filter = _TerminalFilter(self)
            for handler in _terminal_handlers(logger):
                handler.addFilter(self._filter)
                self._filtered_handlers.append(handler)

    def log(self, record: dict) -> None:
        if "train/loss" in record:
            line = format_train_line(record, self.total_steps, self.max_wallclock_ms)
            if self.interactive:
                self.logger.info(line, extra={PROGRESS_ATTR: True})
                self._draw_progress_line(line)
            else:
                self.logger.info(line)
        if any(key.startswith(("val/", "quant/")) for key in record):
            self.logger.info(format_eval_line(record))

    def finish(self, summary: dict) -> None:
        self.end_progress_line()
        for handler in self._filtered_handlers:
            handler.removeFilter(self._filter)
        self._filtered_handlers.clear()

    def end_progress_line(self) -> None:
        """Move past the progress line (it stays visible) so that the next output starts on a fresh line."""
        if self._progress_shown:
            self._progress_shown = False
            self.stream.write("\n")
            self.stream.flush()

    def _draw_progress_line(self, line: str) -> None:
        # A line longer than the terminal wraps, and `\r` would then only redraw its last row.
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r" + line[:width] + "\x1b[K")
        self.stream.flush()
        self._progress_shown = True


def _terminal_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record from `logger` reaches that write to a terminal (not files)."""
    handlers = []
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            is_stream = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if is_stream and _is_terminal(handler.stream):
                handlers.append(handler)
        current = current.parent if current.propagate else None
    return handlers
