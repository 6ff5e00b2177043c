"""metrics.jsonl: one JSON object per event, flushed line by line so that a crash loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

from speedrun.sinks.base import Sink


class JsonlSink(Sink):
    """Appends each record to `path` as one JSON line (non-finite floats are written as NaN/Infinity,
    which Python's json and pandas read back)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Append, so that a resumed run continues the same file.
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self, summary: dict) -> None:
        # summary.json belongs to the entry point; here there is only the file to close.
        self._file.close()
