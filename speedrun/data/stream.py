"""The distributed token stream: the reference's TokenStream + DistributedTokenLoader, resumable.

All ranks walk the same endless stream (shards in order, wrapping around forever). Each call
to `next_batch` consumes one contiguous chunk of `(local_tokens + 1) * world_size` tokens and
rank r keeps the span `[r * (local_tokens + 1), (r + 1) * (local_tokens + 1))`; the extra token
lets x and y be the same span shifted by one. Ranks only copy their own span: the rest of the
chunk is skipped by position arithmetic, so a rank never reads the other ranks' tokens.

Shards are memory-mapped (one open at a time) and copied straight into the int64 batch, so a
batch costs one pass over its own tokens whatever the shard size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from speedrun.data import DataError
from speedrun.data.shards import ShardError, load_shard, read_shard_header


class DistributedTokenLoader:
    def __init__(self, files: list[Path], rank: int, world_size: int, seq_len: int, device: torch.device):
        if not files:
            raise DataError(
                "DistributedTokenLoader got no shard files; check the data source's train pattern"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"DistributedTokenLoader: rank={rank} is not in [0, world_size={world_size})")
        if seq_len < 1:
            raise DataError(f"DistributedTokenLoader: seq_len={seq_len} must be positive")
        self.files = [Path(f) for f in files]
        self.rank = rank
        self.world_size = world_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        # Stream position: the next token to read is tokens(files[shard])[offset].
        self._shard = 0
        self._offset = 0
        self._lengths: dict[int, int] = {}  # token count per shard index, read from headers on demand
        self._open_index = -1
        self._open_tokens: np.ndarray | None = None
        # CUDA only: two pinned host buffers (one being copied to the GPU, one being filled) and
        # the batch prepared ahead of time. `_prefetched` = (local_tokens, buffer index, position
        # after that batch); the position *before* it is the loader's public state.
        self._pinned: list[torch.Tensor] = []
        self._copy_done: list[torch.cuda.Event | None] = [None, None]
        self._prefetched: tuple[int, int, tuple[int, int]] | None = None
        self._state_before_prefetch = (0, 0)

    # ---- shard access -------------------------------------------------------------------

    def _length(self, index: int) -> int:
        if index not in self._lengths:
            try:
                self._lengths[index] = read_shard_header(self.files[index])
            except ShardError as e:
                raise DataError(str(e)) from None
        return self._lengths[index]

    def _tokens(self, index: int) -> np.ndarray:
        if index != self._open_index:
            self._open_tokens = None  # drop the previous memmap before opening the next
            try:
                self._open_tokens = load_shard(self.files[index])
            except ShardError as e:
                raise DataError(str(e)) from None
            self._open_index = index
        return self._open_tokens

    def _next_shard(self) -> None:
        self._shard = (self._shard + 1) % len(self.files)
        self._offset = 0

    def _ensure_available(self) -> None:
        """Move past exhausted (or empty) shards, wrapping around like the reference."""
        empty_in_a_row = 0
        while self._offset >= self._length(self._shard):
            if self._length(self._shard) == 0:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.files):
                    raise DataError(f"all {len(self.files)} train shards are empty (first: {self.files[0]})")
            self._next_shard()

    def _skip(self, n: int) -> None:
        while n > 0:
            self._ensure_available()
            k = min(n, self._length(self._shard) - self._offset)
            self._offset += k
            n -= k

    def _read_into(self, out: np.ndarray) -> None:
        """Fill `out` (int64) with the next out.size tokens, casting from uint16 in the copy."""
        filled = 0
        while filled < out.size:
            self._ensure_available()
            tokens = self._tokens(self._shard)
            k = min(out.size - filled, tokens.size - self._offset)
            np.copyto(out[filled : filled + k], tokens[self._offset : self._offset + k])
            self._offset += k
            filled += k

    def _read_rank_span(self, local_tokens: int, out: np.ndarray) -> None:
        """Consume one global chunk, copying only this rank's span of local_tokens + 1 tokens."""
        span = local_tokens + 1
        self._skip(self.rank * span)
        self._read_into(out)
        self._skip((self.world_size - 1 - self.rank) * span)

    # ---- public API ---------------------------------------------------------------------

    def next_batch(self, local_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), int64 of shape (local_tokens // seq_len, seq_len), on the device."""
        if local_tokens <= 0 or local_tokens % self.seq_len != 0:
            raise DataError(
                f"next_batch: local_tokens={local_tokens} must be a positive multiple of seq_len={self.seq_len}; "
                "make the per-rank micro-batch a whole number of sequences"
            )
        if self.device.type == "cuda":
            span = self._next_span_cuda(local_tokens)
        else:
            # A fresh tensor per batch: the caller may still hold the previous x and y.
            span = torch.empty(local_tokens + 1, dtype=torch.int64)
            self._read_rank_span(local_tokens, span.numpy())
        x = span[:-1].view(-1, self.seq_len)
        y = span[1:].view(-1, self.seq_len)
        return x, y

    def _fill_pinned(self, local_tokens: int, slot: int) -> None:
        if len(self._pinned) != 2 or self._pinned[0].numel() != local_tokens + 1:
            self._pinned = [torch.empty(local_tokens + 1, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._copy_done = [None, None]
        if (event := self._copy_done[slot]) is not None:
            event.synchronize()  # the GPU copy out of this buffer must finish before we overwrite it
        self._read_rank_span(local_tokens, self._pinned[slot].numpy())

    def _next_span_cuda(self, local_tokens: int) -> torch.Tensor:
        if self._prefetched is not None and self._prefetched[0] != local_tokens:
            # A different batch size than prefetched: rewind and read the batch afresh.
            self._shard, self._offset = self._state_before_prefetch
            self._prefetched = None
        if self._prefetched is None:
            slot = 0
            self._fill_pinned(local_tokens, slot)
            after = (self._shard, self._offset)
        else:
            _, slot, after = self._prefetched
        span = self._pinned[slot].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copy_done[slot] = event
        # Prepare the next batch on the host while the GPU works through the queued step.
        self._state_before_prefetch = after
        next_slot = 1 - slot
        self._fill_pinned(local_tokens, next_slot)
        self._prefetched = (local_tokens, next_slot, (self._shard, self._offset))
        return span

    def state_dict(self) -> dict[str, int]:
        """The stream position after the last batch returned (prefetching does not move it)."""
        shard, offset = (
            self._state_before_prefetch if self._prefetched is not None else (self._shard, self._offset)
        )
        return {"shard": shard, "offset": offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        shard, offset = int(state["shard"]), int(state["offset"])
        if not 0 <= shard < len(self.files):
            raise DataError(f"loader state shard={shard} is out of range for {len(self.files)} train shards")
        if not 0 <= offset <= self._length(shard):
            raise DataError(
                f"loader state offset={offset} is outside {self.files[shard]} ({self._length(shard)} tokens); "
                "the checkpoint was made with different data"
            )
        self._shard, self._offset = shard, offset
        self._prefetched = None


def measure_loader_throughput(
    files: list[Path], seq_len: int, local_tokens: int, world_size: int = 1, seconds: float = 2.0
) -> float:
    """Tokens per second that one rank's loader delivers on the CPU (rank 0 of world_size)."""
    loader = DistributedTokenLoader(
        files, rank=0, world_size=world_size, seq_len=seq_len, device=torch.device("cpu")
    )
    loader.next_batch(local_tokens)  # warm-up: opens the first shard
    batches = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(16):
            loader.next_batch(local_tokens)
        batches += 16
    return batches * local_tokens / elapsed
