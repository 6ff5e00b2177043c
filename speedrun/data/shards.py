"""The token shard format shared with parameter-golf and modded-nanogpt.

A shard is a 256-int32 little-endian header followed by uint16 tokens:
header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = token count.
Every error names the file, because a researcher with 80 shards needs to know which one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = np.iinfo(np.uint16).max


class ShardError(ValueError):
    """A shard that the loader must not accept (bad header, wrong size, missing)."""


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file not found") from None
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header "
            "(an empty or interrupted download?); delete it and fetch or prepare it again"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: size {size} bytes does not match its header ({num_tokens} tokens = {expected} bytes); "
            "the file is truncated or corrupt, delete it and fetch or prepare it again"
        )
    return num_tokens


def load_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a validated shard's tokens (read-only, no copy)."""
    num_tokens = read_shard_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens as a shard, atomically: a temporary name, fsync, then rename.

    A crash mid-write therefore never leaves a file the loader would accept.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ShardError(f"{path}: token ids must fit in uint16 (0..{MAX_TOKEN_ID})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        # A memoryview, not .tobytes(): no second copy of a shard that may hold 100M tokens.
        f.write(memoryview(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Sorted `*_{split}_NNNNNN.bin` files in a folder."""
    return sorted(Path(folder).glob(f"*_{split}_[0-9]*.bin"))
