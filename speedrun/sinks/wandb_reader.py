"""Read an offline wandb run back from disk, for tests and scripts that check what wandb would upload.

An offline run is `wandb/offline-run-<time>-<id>/run-<id>.wandb`: a LevelDB-style log of protobuf
`Record`s (https://github.com/google/leveldb/blob/main/doc/log_format.md) behind a 7-byte header
`:W&B` + magic 0xBEE1 + version 0. The installed wandb writes it (from its Go core) but ships no Python
reader, so this file decodes the framing and lets wandb's own protobuf classes parse each record.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_BYTES = 32768
CHUNK_HEADER_BYTES = 7  # crc32 (uint32), length (uint16), chunk type (uint8), little-endian
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    data = path.read_bytes()
    if not data.startswith(FILE_HEADER):
        raise ValueError(
            f"{path}: not a wandb offline run file (header {data[:7]!r}, expected {FILE_HEADER!r})"
        )
    offset = len(FILE_HEADER)
    while True:
        # A chunk header never straddles a block boundary: the writer pads the block's tail with zeros.
        if BLOCK_BYTES - offset % BLOCK_BYTES < CHUNK_HEADER_BYTES:
            offset += BLOCK_BYTES - offset % BLOCK_BYTES
        if offset + CHUNK_HEADER_BYTES > len(data):
            return
        checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        payload = data[offset + CHUNK_HEADER_BYTES : offset + CHUNK_HEADER_BYTES + length]
        if len(payload) < length:
            return  # the writer died mid-record; everything before it is intact
        # The checksum covers the chunk type byte, then the payload.
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: corrupt record at byte {offset} (checksum mismatch)")
        yield kind, payload
        offset += CHUNK_HEADER_BYTES + length


def iter_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every protobuf Record of a `.wandb` file, in the order they were written."""
    pending = b""
    for kind, payload in _chunks(Path(path)):
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        else:  # LAST
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        yield record


def wait_until_complete(path: str | Path, timeout_s: float = 10.0) -> bool:
    """Wait until the `.wandb` file holds its exit record; False if it does not within `timeout_s`.

    `run.finish()` returns once wandb's core has the exit record, but the core writes the file out when it
    closes the run's stream, which it does asynchronously (or at the latest when the process exits).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(record.WhichOneof("record_type") == "exit" for record in iter_records(path)):
                return True
        except (OSError, ValueError):
            pass  # not created yet, or caught mid-write
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def find_offline_runs(run_dir: str | Path) -> list[Path]:
    """The `.wandb` files of the offline runs under `run_dir/wandb/`, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda path: path.parent.name)


def _item_key(item: object) -> str:
    return item.key or ".".join(item.nested_key)  # type: ignore[attr-defined]


def read_offline_run(run_dir: str | Path) -> dict:
    """The latest offline wandb run under `run_dir`, as plain Python values:

    `{"id", "config", "group", "name", "job_type", "tags", "notes", "history": [row, ...], "summary",
    "exit_code"}`; `exit_code` is None when the run never finished. History rows include wandb's own
    `_step`, `_runtime` and `_timestamp`.
    """
    runs = read_offline_runs(run_dir)
    if not runs:
        raise FileNotFoundError(
            f"no offline wandb run under {run_dir}/wandb/ (expected offline-run-*/run-*.wandb)"
        )
    return runs[-1]


def read_offline_runs(run_dir: str | Path) -> list[dict]:
    """Every offline wandb run file under `run_dir`, oldest first (a resumed run adds one per attempt,
    all with the same `id`), each as `read_offline_run` describes."""
    return [_read_run_file(path) for path in find_offline_runs(run_dir)]


def _read_run_file(path: Path) -> dict:
    result: dict = {"id": None, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            result.update(
                id=run.run_id or None,
                group=run.run_group or None,
                name=run.display_name or None,
                job_type=run.job_type or None,
                tags=list(run.tags),
                notes=run.notes or None,
            )
            _apply_config(result["config"], run.config)
        elif kind == "config":
            _apply_config(result["config"], record.config)
        elif kind == "history":
            result["history"].append(
                {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                result["summary"][_item_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                result["summary"].pop(_item_key(item), None)
        elif kind == "exit":
            result["exit_code"] = record.exit.exit_code
    return result


def _apply_config(config: dict, record: object) -> None:
    for item in record.update:  # type: ignore[attr-defined]
        key = _item_key(item)
        if key != "_wandb":  # wandb's own bookkeeping, not the run's config
            config[key] = json.loads(item.value_json)
    for item in record.remove:  # type: ignore[attr-defined]
        config.pop(_item_key(item), None)
