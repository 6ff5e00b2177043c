"""Validation loss and bits-per-byte, exactly as parameter-golf's eval_val.

Bits-per-byte makes runs with different tokenizers comparable: the summed cross-entropy (in
bits) divided by the UTF-8 bytes of the text the target tokens stand for. The byte count comes
from three lookup tables over the vocabulary (each tokenizer kind builds them under its own rules:
`speedrun.data.tokenizer.TokenBytes`), so it costs one gather per batch on the device.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def count_target_bytes(
    prev_ids: torch.Tensor, target_ids: torch.Tensor, luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """UTF-8 bytes the target tokens stand for, given the token before each (a float64 scalar)."""
    base_bytes, has_leading_space, is_boundary_token = luts
    token_bytes = base_bytes[target_ids].to(torch.int16)
    token_bytes += (has_leading_space[target_ids] & ~is_boundary_token[prev_ids]).to(torch.int16)
    return token_bytes.to(torch.float64).sum()


def evaluate(
    model: nn.Module,
    val_tokens: torch.Tensor,
    luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    seq_len: int,
    batch_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float | None]:
    """(val_loss in nats/token, val_bpb) over all of val_tokens, summed across ranks.

    Without byte tables (`luts` None: data without a tokenizer) val_bpb is None.

    `batch_tokens` is this rank's tokens per forward pass (whole sequences). Each rank scores a
    contiguous share of the `(len - 1) // seq_len` sequences; `model(x, y)` returns the mean loss.
    """
    device = torch.device(device)
    local_batch_seqs = batch_tokens // seq_len
    if local_batch_seqs < 1:
        raise ValueError(
            f"evaluate: batch_tokens={batch_tokens} must hold at least one sequence of {seq_len}"
        )
    total_seqs = (val_tokens.numel() - 1) // seq_len
    seq_start = (total_seqs * rank) // world_size
    seq_end = (total_seqs * (rank + 1)) // world_size
    # float64 sums: half a billion tokens of float32 loss would lose digits the bpb needs.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    token_count = torch.zeros((), device=device, dtype=torch.float64)
    byte_count = torch.zeros((), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    # no_grad, not inference_mode: tensors cached during evaluation (the RoPE tables) are reused
    # by training steps, and inference tensors cannot be saved for backward.
    with torch.no_grad():
        for batch_seq_start in range(seq_start, seq_end, local_batch_seqs):
            batch_seq_end = min(batch_seq_start + local_batch_seqs, seq_end)
            raw = val_tokens[batch_seq_start * seq_len : batch_seq_end * seq_len + 1]
            local = raw.to(device=device, dtype=torch.int64, non_blocking=True)
            x = local[:-1].reshape(-1, seq_len)
            y = local[1:].reshape(-1, seq_len)
            with torch.autocast(
                device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                batch_loss = model(x, y).detach()
            batch_token_count = float(y.numel())
            loss_sum += batch_loss.to(torch.float64) * batch_token_count
            token_count += batch_token_count
            if luts is not None:
                byte_count += count_target_bytes(x.reshape(-1), y.reshape(-1), luts)
    if dist.is_available() and dist.is_initialized():
        for total in (loss_sum, token_count, byte_count):
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    val_loss = (loss_sum / token_count).item()
    if luts is None:
        return float(val_loss), None
    bits_per_token = val_loss / math.log(2.0)
    tokens_per_byte = token_count.item() / byte_count.item()
    return float(val_loss), float(bits_per_token * tokens_per_byte)
