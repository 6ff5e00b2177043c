"""The shard format: a round trip, and every way a file can be broken is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speedrun.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardError,
    list_shards,
    load_shard,
    read_shard_header,
    write_shard,
)


def test_round_trip_keeps_every_token(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000).astype(np.uint16)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [SHARD_MAGIC, 1, 1000]
    assert read_shard_header(path) == 1000
    loaded = load_shard(path)
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


def test_round_trip_of_an_empty_shard(tmp_path: Path) -> None:
    path = tmp_path / "x_val_000000.bin"
    write_shard(path, np.zeros(0, dtype=np.uint16))
    assert read_shard_header(path) == 0
    assert load_shard(path).size == 0


def test_write_refuses_ids_outside_uint16(tmp_path: Path) -> None:
    path = tmp_path / "x_train_000000.bin"
    with pytest.raises(ShardError, match="x_train_000000.bin"):
        write_shard(path, np.array([1, 65536]))
    with pytest.raises(ShardError, match="x_train_000000.bin"):
        write_shard(path, np.array([-1, 2]))
    assert not path.exists()


def test_list_shards_sorts_and_filters_by_split(tmp_path: Path) -> None:
    for name in ["a_train_000001.bin", "a_train_000000.bin", "a_val_000000.bin", "a_train_notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "train")] == ["a_train_000000.bin", "a_train_000001.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["a_val_000000.bin"]


def _good_shard_bytes(num_tokens: int = 10) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [SHARD_MAGIC, 1, num_tokens]
    return header.tobytes() + np.arange(num_tokens, dtype="<u2").tobytes()


def _with_header_int(index: int, value: int) -> bytes:
    data = bytearray(_good_shard_bytes())
    data[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    return bytes(data)


CORRUPT_SHARDS = {
    "zero-byte": (b"", "shorter than"),
    "shorter than header": (_good_shard_bytes()[:100], "shorter than"),
    "bad magic": (_with_header_int(0, 12345), "bad magic 12345"),
    "bad version": (_with_header_int(1, 7), "version 7"),
    "truncated tokens": (_good_shard_bytes()[:-2], "does not match its header"),
    "larger than header says": (_good_shard_bytes() + b"\x00\x00", "does not match its header"),
}


@pytest.mark.parametrize("case", list(CORRUPT_SHARDS))
def test_corrupt_shard_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    data, reason = CORRUPT_SHARDS[case]
    path = tmp_path / "corrupt_train_000003.bin"
    path.write_bytes(data)
    for read in (read_shard_header, load_shard):
        with pytest.raises(ShardError) as error:
            read(path)
        assert str(path) in str(error.value)
        assert reason in str(error.value)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    path = tmp_path / "gone_val_000000.bin"
    with pytest.raises(ShardError, match="gone_val_000000.bin.*not found"):
        read_shard_header(path)
