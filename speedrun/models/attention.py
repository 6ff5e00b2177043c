"""Causal attention that stays inside each document and inside a block-wise sliding window.

modded-nanogpt trains on one long packed sequence per device: documents back to back, each opened
by a BOS token. Key k is visible to query q when

    k <= q,   both lie in the same document,   and   q // B - k // B < W

with B the block size (128 tokens in the record) and W the window in blocks. The window rule only
depends on the blocks of q and k, so FlexAttention can skip whole blocks outside it exactly.

Two ways to apply the same rule:
- `dense_window_mask`: a (batch, 1, T, T) boolean mask for `scaled_dot_product_attention`, exact
  and simple; memory grows with T², so it is the CPU path (and the tests' path);
- `flex_block_mask`: a FlexAttention `BlockMask` built directly from block-level tables, the way
  the record builds its own (no T² tensor, so 64K-token sequences fit); the CUDA path.
Each row of the batch is its own packed sequence: documents never span two rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def document_ids(input_ids: Tensor, bos_id: int) -> Tensor:
    """(batch, T) -> the document index of every token: the count of BOS tokens up to and including it."""
    return (input_ids == bos_id).cumsum(dim=-1)


def dense_window_mask(docs: Tensor, window_blocks: Tensor, block_size: int) -> Tensor:
    """The visibility rule as a (batch, 1, T, T) boolean mask (True = may attend)."""
    positions = torch.arange(docs.size(-1), device=docs.device)
    q, k = positions[:, None], positions[None, :]
    causal_window = (k <= q) & (q // block_size - k // block_size < window_blocks)
    same_document = docs[:, :, None] == docs[:, None, :]
    return (causal_window[None] & same_document)[:, None]


def _kv_block_lists(allowed: Tensor) -> tuple[Tensor, Tensor]:
    """(batch, Q blocks, KV blocks) booleans -> FlexAttention's per-query-block KV lists: how many
    blocks, and their indices (the allowed ones first; the order within them does not matter)."""
    counts = allowed.sum(dim=-1, dtype=torch.int32)
    indices = allowed.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    # A head dimension of 1: every head shares the mask.
    return counts[:, None].contiguous(), indices[:, None].contiguous()


def flex_block_mask(docs: Tensor, window_blocks: Tensor, block_size: int) -> BlockMask:
    """The visibility rule as a FlexAttention BlockMask (rows of docs: whole multiples of block_size).

    Documents are contiguous, so a block covers the document range [first token's, last token's].
    A KV block is skipped when it is after the query block, outside the window, or shares no
    document with it; it is "full" (no per-token mask needed) when it is strictly earlier, inside
    the window, and both blocks lie in one and the same document; any other visible block is
    "partial" and gets the per-token test. That test repeats the whole rule, window included: the
    compiled kernel only runs it on partial blocks (where the window always holds), but uncompiled
    FlexAttention ignores the block lists and applies it to every pair.
    """
    batch, length = docs.shape
    num_blocks = length // block_size
    first = docs[:, ::block_size]  # (batch, blocks): document of each block's first token
    last = docs[:, block_size - 1 :: block_size]  # ... and of its last token
    blocks = torch.arange(num_blocks, device=docs.device)
    q_block, kv_block = blocks[:, None], blocks[None, :]
    in_window = q_block - kv_block < window_blocks
    overlap = (first[:, :, None] <= last[:, None, :]) & (first[:, None, :] <= last[:, :, None])
    one_document = (first[:, :, None] == last[:, None, :]) & (first[:, None, :] == last[:, :, None])
    visible = (kv_block <= q_block) & in_window & overlap
    full = (kv_block < q_block) & in_window & one_document
    partial_counts, partial_indices = _kv_block_lists(visible & ~full)
    full_counts, full_indices = _kv_block_lists(full)

    def visible_pair(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        in_window_pair = q_idx // block_size - kv_idx // block_size < window_blocks
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx]) & in_window_pair

    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=block_size, mask_mod=visible_pair,
    )  # fmt: skip


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """FlexAttention through torch.compile, built once: uncompiled, it materialises the full score
    matrix (what the block mask exists to avoid)."""
    return torch.compile(flex_attention, dynamic=False)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask, scale: float) -> Tensor:
    """Attention of (batch, heads, T, head_dim) tensors under a mask from one of the builders above."""
    if isinstance(mask, BlockMask):
        # Inside a compiled model, torch.compile turns flex_attention into its fused kernel itself (as in
        # the record); an eager model calls the separately compiled one.
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        return flex(q, k, v, block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
