"""Checks that catch wrong data before training, each refused in one line that names the file.

- The tokenizer must be the one the shards were prepared with, when their folder's `manifest.json`
  records it (a different tokenizer of the same size gives a silently wrong val_bpb).
- Every token id must fit the vocabulary (else an embedding lookup fails deep inside the model).

The largest id of each shard is cached in the user cache folder, keyed by the shard's path, size and
modification time: checking 80 FineWeb shards (16 GB) reads them once, later runs read a small JSON file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from speedrun.data import DataError
from speedrun.data.paths import cache_root
from speedrun.data.shards import ShardError, load_shard
from speedrun.data.tokenizer import Tokenizer

MANIFEST_NAME = "manifest.json"
MAX_IDS_CACHE = "shard_max_token_ids.json"


def recorded_tokenizer(folder: Path) -> tuple[Path, str] | None:
    """(tokenizer file, sha256) as `folder/manifest.json` records them (`speedrun.prepare` writes both);
    None without a manifest or when it records none (parameter-golf's, the stdlib cache's)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        entry = manifest["tokenizer"]
        return folder / str(entry.get("file", "")), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_tokenizer_matches_manifest(folder: Path, tokenizer: Tokenizer, allowed: bool) -> str | None:
    """Refuse a tokenizer other than the one `folder/manifest.json` records; with `allowed`, return the
    warning to log instead. None when they agree or the folder records no tokenizer."""
    recorded = recorded_tokenizer(folder)
    if recorded is None:
        return None
    actual = tokenizer.fingerprint()
    if actual == recorded[1]:
        return None
    message = (
        f"data.tokenizer {tokenizer.source} (sha256 {actual[:12]}...) is not the tokenizer the shards in "
        f"{folder} were prepared with ({folder / MANIFEST_NAME}: {recorded[0].name}, sha256 {recorded[1][:12]}...)"
    )
    if allowed:
        return f"{message}; accepted because data.allow_tokenizer_mismatch=true, so val_bpb is not comparable"
    raise DataError(
        f"{message}; use that tokenizer, or set data.allow_tokenizer_mismatch=true to evaluate with this one"
    )


def check_token_ids(shards: Sequence[Path], limit: int, limit_name: str, fix: str) -> None:
    """Refuse the first shard holding a token id >= `limit`, which the message calls `limit_name`."""
    for shard, largest in zip(shards, max_token_ids(shards), strict=True):
        if largest >= limit:
            raise DataError(f"{shard}: token id {largest} >= {limit_name}; {fix}")


def max_token_ids(shards: Sequence[Path]) -> list[int]:
    """The largest token id of each shard (-1 for an empty one), from the cache where it is current."""
    cache_file = cache_root() / MAX_IDS_CACHE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    result, changed = [], False
    for shard in shards:
        stat = shard.stat()
        key, stamp = str(shard.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(key)
        if isinstance(entry, list) and entry[:2] == stamp:
            result.append(int(entry[2]))
            continue
        try:
            tokens = load_shard(shard)  # memory-mapped: the max streams through the file once
        except ShardError as error:
            raise DataError(str(error)) from None
        largest = int(np.max(tokens)) if tokens.size else -1
        cache[key] = [*stamp, largest]
        result.append(largest)
        changed = True
    if changed:
        # Whole-file replace: concurrent runs may each write theirs; the loser's entries are just recomputed.
        tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(cache), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError:
            tmp.unlink(missing_ok=True)  # a cache that cannot be written costs time, never correctness
    return result
