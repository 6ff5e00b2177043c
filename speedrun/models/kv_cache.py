"""A key/value cache for generation: each attention layer's keys and values of the positions seen so far.

Generating a token with a transformer needs the keys and values of every earlier position; without a
cache they are recomputed from the whole sequence for every new token (quadratic work), with one they
are computed once and appended. The cache preallocates `max_len` positions per layer (on the first
write, with that write's dtype and device), so appending is a copy into place, not a concatenation.

A model that supports it (speedrun/models/protocol.py: `new_kv_cache`, `logits(..., kv_cache=...)`)
hands each attention layer its `LayerKV`; the layer reads `position` (where its new positions start,
for RoPE and the causal mask) and calls `update`; the model calls `advance` once all layers are done.
"""

from __future__ import annotations

from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions held, the same for every layer between two forwards
        self._keys: list[Tensor | None] = [None] * num_layers
        self._values: list[Tensor | None] = [None] * num_layers

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self, index)

    def update(self, index: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer `index`'s keys and values of the new positions, (batch, heads, new, head_dim);
        return those of every position so far, (batch, heads, length + new, head_dim)."""
        end = self.length + keys.size(2)
        if end > self.max_len:
            raise ValueError(f"the key/value cache holds {self.max_len} positions; {end} were asked for")
        if self._keys[index] is None:
            shape = (keys.size(0), keys.size(1), self.max_len, keys.size(3))
            self._keys[index] = keys.new_zeros(shape)
            self._values[index] = values.new_zeros(shape)
        cached_keys, cached_values = self._keys[index], self._values[index]
        cached_keys[:, :, self.length : end] = keys
        cached_values[:, :, self.length : end] = values
        return cached_keys[:, :, :end], cached_values[:, :, :end]

    def advance(self, new_positions: int) -> None:
        """Every layer has stored the new positions: they are now part of the context."""
        self.length += new_positions


class LayerKV:
    """One attention layer's view of the cache."""

    def __init__(self, cache: KVCache, index: int):
        self.cache = cache
        self.index = index

    @property
    def position(self) -> int:
        """The absolute position of the first new token."""
        return self.cache.length

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(self.index, keys, values)
