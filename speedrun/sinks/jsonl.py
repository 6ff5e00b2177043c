"""metrics.jsonl: one JSON object per event, flushed line by line so that a crash loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

from speedrun.sinks.base import Sink
from speedrun.summary import finite_only


class JsonlSink(Sink):
    """Appends each record to `path` as one strict JSON line: a non-finite number is written as null,
    and the record's `nonfinite` names it and what it was (`{"train/loss": "nan"}`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Append, so that a resumed run continues the same file.
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict) -> None:
        nonfinite: dict[str, str] = {}
        record = finite_only(record, nonfinite=nonfinite)
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def finish(self, summary: dict) -> None:
        # summary.json belongs to the entry point; here there is only the file to close.
        self._file.close()
