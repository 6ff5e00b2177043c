"""The token stream against an independent model of the reference: one endless concatenation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speedrun.data import DataError
from speedrun.data.shards import write_shard
from speedrun.data.stream import DistributedTokenLoader, measure_loader_throughput

# Uneven shards, one of them empty, so batches straddle boundaries and the stream wraps often.
SHARD_SIZES = [50, 0, 37, 64]


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    files, start = [], 0
    for index, size in enumerate(SHARD_SIZES):
        path = tmp_path / f"t_train_{index:06d}.bin"
        write_shard(path, np.arange(start, start + size) % 65536)
        files.append(path)
        start += size
    return files


def reference_batches(files: list[Path], rank: int, world_size: int, seq_len: int, local_tokens: int, n: int):
    """What the reference TokenStream + DistributedTokenLoader yield: chunks of the repeated stream."""
    one_pass = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in files]).astype(np.int64)
    span = local_tokens + 1
    chunk = span * world_size
    stream = np.tile(one_pass, n * chunk // one_pass.size + 2)
    for i in range(n):
        local = stream[i * chunk + rank * span : i * chunk + (rank + 1) * span]
        yield local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (0, 3), (2, 3)])
def test_batches_match_the_reference_stream(shards: list[Path], rank: int, world_size: int) -> None:
    seq_len, local_tokens = 4, 12
    loader = DistributedTokenLoader(shards, rank, world_size, seq_len, torch.device("cpu"))
    # 40 batches x 13 tokens x world_size: several full passes over the 151-token stream.
    for expected_x, expected_y in reference_batches(shards, rank, world_size, seq_len, local_tokens, 40):
        x, y = loader.next_batch(local_tokens)
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (3, 4)
        np.testing.assert_array_equal(x.numpy(), expected_x)
        np.testing.assert_array_equal(y.numpy(), expected_y)


def test_ranks_partition_each_chunk(shards: list[Path]) -> None:
    loaders = [DistributedTokenLoader(shards, r, 2, 8, torch.device("cpu")) for r in range(2)]
    first, second = (loader.next_batch(8) for loader in loaders)
    assert first[0].flatten().tolist() == list(range(8))
    assert second[0].flatten().tolist() == list(range(9, 17))  # rank 1 starts after rank 0's 8 + 1 tokens


def test_a_batch_survives_the_next_call(shards: list[Path]) -> None:
    loader = DistributedTokenLoader(shards, 0, 1, 4, torch.device("cpu"))
    x, _ = loader.next_batch(8)
    kept = x.clone()
    loader.next_batch(8)
    assert torch.equal(x, kept)


# Each call consumes 2 x 9 tokens: after 2 calls the next straddles shards 0 and 2; after 11 it has wrapped.
@pytest.mark.parametrize("batches_before", [0, 2, 5, 11])
def test_restored_state_continues_with_the_same_batches(shards: list[Path], batches_before: int) -> None:
    original = DistributedTokenLoader(shards, 1, 2, 4, torch.device("cpu"))
    for _ in range(batches_before):
        original.next_batch(8)
    state = original.state_dict()
    assert set(state) == {"shard", "offset"}
    restored = DistributedTokenLoader(shards, 1, 2, 4, torch.device("cpu"))
    restored.load_state_dict(state)
    for _ in range(15):
        (x0, y0), (x1, y1) = original.next_batch(8), restored.next_batch(8)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_state_crosses_a_shard_boundary(shards: list[Path]) -> None:
    loader = DistributedTokenLoader(shards, 0, 1, 4, torch.device("cpu"))
    for _ in range(5):  # 5 x 9 = 45 tokens: still in shard 0 (50 tokens)
        loader.next_batch(8)
    assert loader.state_dict() == {"shard": 0, "offset": 45}
    loader.next_batch(8)  # 45 + 9 = 54: 4 tokens into shard 2, past the empty shard 1
    assert loader.state_dict() == {"shard": 2, "offset": 4}


def test_bad_arguments_are_named(shards: list[Path]) -> None:
    with pytest.raises(DataError, match="no shard files"):
        DistributedTokenLoader([], 0, 1, 4, torch.device("cpu"))
    loader = DistributedTokenLoader(shards, 0, 1, 4, torch.device("cpu"))
    with pytest.raises(DataError, match="local_tokens=10 must be a positive multiple of seq_len=4"):
        loader.next_batch(10)
    with pytest.raises(DataError, match="offset=51"):
        loader.load_state_dict({"shard": 0, "offset": 51})
    with pytest.raises(DataError, match="shard=4"):
        loader.load_state_dict({"shard": 4, "offset": 0})


def test_all_empty_shards_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e_train_000000.bin"
    write_shard(path, np.zeros(0, dtype=np.uint16))
    with pytest.raises(DataError, match="empty"):
        DistributedTokenLoader([path], 0, 1, 4, torch.device("cpu")).next_batch(4)


def test_a_corrupt_shard_is_named_when_reached(shards: list[Path]) -> None:
    shards[2].write_bytes(shards[2].read_bytes()[:-2])
    loader = DistributedTokenLoader(shards, 0, 1, 4, torch.device("cpu"))
    for _ in range(5):  # 45 tokens: shard 0 is fine
        loader.next_batch(8)
    with pytest.raises(DataError, match=str(shards[2])):
        loader.next_batch(8)


def test_throughput_is_measured(shards: list[Path]) -> None:
    assert measure_loader_throughput(shards, seq_len=4, local_tokens=8, world_size=2, seconds=0.05) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_and_state_match_the_cpu_loader(shards: list[Path]) -> None:
    cpu = DistributedTokenLoader(shards, 0, 2, 4, torch.device("cpu"))
    gpu = DistributedTokenLoader(shards, 0, 2, 4, torch.device("cuda"))
    for local_tokens in [8, 8, 8, 4, 8, 8]:  # a size change discards the prefetched batch
        x_cpu, y_cpu = cpu.next_batch(local_tokens)
        x_gpu, y_gpu = gpu.next_batch(local_tokens)
        assert x_gpu.is_cuda
        assert torch.equal(x_cpu, x_gpu.cpu()) and torch.equal(y_cpu, y_gpu.cpu())
        assert cpu.state_dict() == gpu.state_dict()  # prefetching does not move the public position
    restored = DistributedTokenLoader(shards, 0, 2, 4, torch.device("cuda"))
    restored.load_state_dict(gpu.state_dict())
    assert torch.equal(restored.next_batch(8)[0], gpu.next_batch(8)[0])
