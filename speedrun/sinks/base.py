"""The sink interface: where training events go (console, metrics.jsonl, wandb, ...).

The trainer calls `log(record)` for every event, `progress(step, train_time_ms, loss)` after every
training step (for live displays; `loss` is None on steps whose loss was not read back from the
device), and `finish(summary)` once at the end, whatever the outcome.
A record always holds `step`, `tokens` and `train_time_ms`, plus the metrics of that event
(`train/loss`, `val/bpb`, ...); a metric may be None where it does not apply (MFU on CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


class Sink:
    """Receives training events. Subclasses override what they need; the defaults do nothing."""

    def log(self, record: dict) -> None:
        """One event: `step`, `tokens`, `train_time_ms` plus that event's metrics."""

    def progress(self, step: int, train_time_ms: float, loss: float | None) -> None:
        """After every training step: cheap, and never a reason to read anything back from the GPU."""

    def finish(self, summary: dict) -> None:
        """End of run; `summary` holds the summary.json fields (`status`, `val_bpb`, ...)."""


class MultiSink(Sink):
    """Fans every call out to several sinks.

    Training must never die because a logger broke: a sink that raises is disabled after one warning,
    and the others carry on.
    """

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.sinks)

    def log(self, record: dict) -> None:
        self._call_each("log", record)

    def progress(self, step: int, train_time_ms: float, loss: float | None) -> None:
        self._call_each("progress", step, train_time_ms, loss)

    def finish(self, summary: dict) -> None:
        self._call_each("finish", summary)

    def _call_each(self, method: str, *payload) -> None:
        for index, sink in enumerate(self.sinks):
            if index in self._broken:
                continue
            try:
                getattr(sink, method)(*payload)
            except Exception as error:  # noqa: BLE001 - any logger failure must not stop training
                self._broken.add(index)
                log.warning(
                    "%s.%s raised %s: %s; this sink is disabled for the rest of the run",
                    type(sink).__name__,
                    method,
                    type(error).__name__,
                    error,
                )
