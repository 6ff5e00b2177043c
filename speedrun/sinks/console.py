"""Human-readable progress: a live tqdm bar on a terminal, plain log lines otherwise.

On a terminal the bar is redrawn every step (step, loss, ms/step, tokens/s and an ETA that accounts
for both the step and the wallclock horizon); the periodic train lines go to train.log only, and
every other log line is printed above the bar (tqdm's logging redirect). Not on a terminal (a file,
a pipe, a cluster's log), each train and evaluation record is one plain log line. Everything goes
through the given logger, so the file handler the entry point installs (train.log) gets every line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from speedrun.sinks.base import Sink

# Set on log records that the terminal shows in the bar rather than as a scrolling line.
PROGRESS_ATTR = "speedrun_progress"
# Weight of the newest step in the smoothed step time the bar shows.
SMOOTHING = 0.1


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


def eta_seconds(
    step: int,
    train_time_ms: float,
    step_ms: float | None,
    total_steps: int | None,
    max_wallclock_ms: float | None,
) -> float | None:
    """Time left until whichever limit ends the run first: the step budget or the wallclock budget."""
    remaining_ms = []
    if total_steps and step_ms is not None:
        remaining_ms.append((total_steps - step) * step_ms)
    if max_wallclock_ms:
        remaining_ms.append(max_wallclock_ms - train_time_ms)
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
    eta = eta_seconds(
        record["step"], record["train_time_ms"], record.get("step_ms"), total_steps, max_wallclock_ms
    )
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


def is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _drop_progress_records(record: logging.LogRecord) -> bool:
    return not getattr(record, PROGRESS_ATTR, False)


class ConsoleSink(Sink):
    """Train and evaluation lines through `logger`; a live bar when `stream` is a terminal.

    `total_steps` and `max_wallclock_ms` (None or 0: no such limit) give the ETA; `tokens_per_step`
    the bar's tokens/s.
    """

    def __init__(
        self,
        total_steps: int | None,
        logger: logging.Logger,
        max_wallclock_ms: float | None = None,
        stream: TextIO | None = None,
        tokens_per_step: int | None = None,
    ) -> None:
        self.total_steps = total_steps or None
        self.max_wallclock_ms = max_wallclock_ms or None
        self.tokens_per_step = tokens_per_step
        self.logger = logger
        stream = stream if stream is not None else sys.stderr
        self.bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()
        self._filtered: list[logging.Handler] = []
        self._step_ms: float | None = None
        self._last: tuple[int, float] | None = None  # (step, train_time_ms) of the previous update
        self._loss: float | None = None
        if is_terminal(stream):
            self._start_bar(stream)

    def _start_bar(self, stream: TextIO) -> None:
        # The periodic train lines are in the bar already: console handlers drop them (train.log keeps
        # them), and every other line is written above the bar instead of through it.
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
                handler.addFilter(_drop_progress_records)
                self._filtered.append(handler)
        self._redirect.enter_context(logging_redirect_tqdm())
        self.bar = tqdm(
            total=self.total_steps,
            file=stream,
            unit="step",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def progress(self, step: int, train_time_ms: float, loss: float | None) -> None:
        if self.bar is None:
            return
        if self._last is not None and step > self._last[0]:
            newest = (train_time_ms - self._last[1]) / (step - self._last[0])
            self._step_ms = (
                newest if self._step_ms is None else SMOOTHING * newest + (1 - SMOOTHING) * self._step_ms
            )
        self._last = (step, train_time_ms)
        if loss is not None:
            self._loss = loss
        parts = []
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._step_ms is not None:
            parts.append(f"{self._step_ms:.1f} ms/step")
            if self.tokens_per_step:
                parts.append(f"{format_rate(self.tokens_per_step / (self._step_ms / 1000))} tok/s")
        eta = eta_seconds(step, train_time_ms, self._step_ms, self.total_steps, self.max_wallclock_ms)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        self.bar.set_postfix_str(" | ".join(parts), refresh=False)
        self.bar.update(step - self.bar.n)

    def log(self, record: dict) -> None:
        if "train/loss" in record:
            line = format_train_line(record, self.total_steps, self.max_wallclock_ms)
            self.logger.info(line, extra={PROGRESS_ATTR: self.bar is not None})
        if any(key.startswith(("val/", "quant/")) for key in record):
            self.logger.info(format_eval_line(record))

    def finish(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()
        for handler in self._filtered:
            handler.removeFilter(_drop_progress_records)
        self._filtered.clear()
