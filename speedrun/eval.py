"""Validation loss and bits-per-byte, as parameter-golf's eval_val, optionally over sliding windows.

Bits-per-byte makes runs with different tokenizers comparable: the summed cross-entropy (in
bits) divided by the UTF-8 bytes of the text the target tokens stand for. The byte count comes
from three lookup tables over the vocabulary (each tokenizer kind builds them under its own rules:
`speedrun.data.tokenizer.TokenBytes`), so it costs one gather per batch on the device.

The validation tokens are cut into windows of `seq_len` tokens (`sliding_windows`). With `stride`
equal to `seq_len` (the default) the windows do not overlap and every target is scored with the
tokens before it in its window as context, exactly as the reference does. With a smaller stride the
windows overlap and each one scores only its last `stride` targets (the first window scores all of
its own), so every target is still scored exactly once, but with at least `seq_len - stride` tokens
of context: parameter-golf's records measure about 0.03 bpb less that way, at `seq_len / stride`
times the compute.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from speedrun.models.protocol import IGNORE_INDEX


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, summed over every rank."""

    loss: float  # mean cross-entropy per scored target, in nats
    bpb: float | None  # bits per byte of the scored targets' text; None without byte tables
    tokens: int  # targets scored (each exactly once)
    time_ms: float  # wall time of the whole evaluation, device work included


def count_target_bytes(
    prev_ids: torch.Tensor,
    target_ids: torch.Tensor,
    luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scored: torch.Tensor | None = None,
) -> torch.Tensor:
    """UTF-8 bytes the target tokens stand for, given the token before each (a float64 scalar).

    `scored` (bool, the shape of target_ids) counts only those targets; None counts them all.
    """
    base_bytes, has_leading_space, is_boundary_token = luts
    token_bytes = base_bytes[target_ids].to(torch.int16)
    token_bytes += (has_leading_space[target_ids] & ~is_boundary_token[prev_ids]).to(torch.int16)
    if scored is not None:
        # A product, not a boolean index: indexing by a mask would wait for the device to count it.
        token_bytes = token_bytes * scored
    return token_bytes.to(torch.float64).sum()


def sliding_windows(num_targets: int, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each window starts and the first of its positions whose target it scores.

    Window `i` reads tokens `starts[i] : starts[i] + seq_len` and predicts the next token at each
    position; it scores the targets at positions `first_scored[i]:`. Together the windows score each of
    the `num_targets` targets exactly once. The first window scores all its targets; each later one,
    `stride` tokens further on, scores its last `stride`, so a scored target has at least
    `seq_len - stride` tokens of context. When `stride` does not divide the remainder, one last window
    ends exactly at the last target and scores only what is left (with more context than the rest):
    windows always hold `seq_len` tokens, so batches keep one shape.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride={stride} must be between 1 and seq_len={seq_len}")
    if seq_len > num_targets:
        raise ValueError(
            f"windows of {seq_len} tokens do not fit in {num_targets} validation targets; "
            "lower trainer.val_seq_len or raise data.val_tokens"
        )
    starts = torch.arange(0, num_targets - seq_len + 1, stride, dtype=torch.int64)
    first_scored = torch.full_like(starts, seq_len - stride)
    first_scored[0] = 0
    covered = int(starts[-1]) + seq_len  # targets 0 .. covered-1 are scored so far
    if covered < num_targets:
        last_start = num_targets - seq_len
        starts = torch.cat([starts, torch.tensor([last_start])])
        first_scored = torch.cat([first_scored, torch.tensor([covered - last_start])])
    return starts, first_scored


def evaluate(
    model: nn.Module,
    val_tokens: torch.Tensor,
    luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    seq_len: int,
    batch_tokens: int,
    stride: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Loss and bits-per-byte over every target of val_tokens, in windows of `seq_len` tokens that
    advance by `stride` (None: `seq_len`, non-overlapping windows), summed across ranks.

    Without byte tables (`luts` None: data without a tokenizer) bpb is None.

    `batch_tokens` is this rank's tokens per forward pass (whole windows). Each rank scores a
    contiguous share of the windows; `model(x, y)` returns the mean loss over the targets that are not
    `IGNORE_INDEX` (speedrun/models/protocol.py), which is how a window leaves out targets it does not score.
    """
    device = torch.device(device)
    stride = seq_len if stride is None else stride
    local_batch_windows = batch_tokens // seq_len
    if local_batch_windows < 1:
        raise ValueError(
            f"evaluate: batch_tokens={batch_tokens} must hold at least one sequence of {seq_len}"
        )
    _synchronize(device)  # queued training work is not evaluation time
    started = time.perf_counter()
    starts, first_scored = sliding_windows(val_tokens.numel() - 1, seq_len, stride)
    share = slice(len(starts) * rank // world_size, len(starts) * (rank + 1) // world_size)
    # float64 sums: half a billion tokens of float32 loss would lose digits the bpb needs.
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, scored targets, bytes
    was_training = model.training
    model.eval()
    # no_grad, not inference_mode: tensors cached during evaluation (the RoPE tables) are reused
    # by training steps, and inference tensors cannot be saved for backward.
    with torch.no_grad():
        for batch in range(share.start, share.stop, local_batch_windows):
            batch_windows = slice(batch, min(batch + local_batch_windows, share.stop))
            sums += _score_windows(
                model, val_tokens, luts, starts[batch_windows], first_scored[batch_windows],
                seq_len, device, autocast_dtype,
            )  # fmt: skip
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss_sum, token_count, byte_count = sums.tolist()
    val_loss = loss_sum / token_count
    bpb = None if luts is None else (val_loss / math.log(2.0)) * (token_count / byte_count)
    return Evaluation(float(val_loss), bpb, int(token_count), 1000.0 * (time.perf_counter() - started))


def _score_windows(
    model: nn.Module,
    val_tokens: torch.Tensor,
    luts,
    starts: torch.Tensor,
    first_scored: torch.Tensor,
    seq_len: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """(summed loss, scored targets, their bytes) of one batch of windows, on the device."""
    # One contiguous copy to the device covers the whole batch; the windows are gathered there.
    first_start = int(starts[0])
    span = val_tokens[first_start : int(starts[-1]) + seq_len + 1]
    span = span.to(device=device, dtype=torch.int64, non_blocking=True)
    if len(starts) * seq_len + 1 == span.numel():  # back-to-back windows: the span is the batch
        windows = span[:-1].reshape(-1, seq_len), span[1:].reshape(-1, seq_len)
    else:
        offsets = (starts - first_start).to(device, non_blocking=True)
        index = offsets[:, None] + torch.arange(seq_len + 1, device=device)
        gathered = span[index]
        windows = gathered[:, :-1], gathered[:, 1:]
    x, y = windows
    # Counted on the host from the plan: no device sync per batch.
    scored_count = float(len(starts) * seq_len - int(first_scored.sum()))
    scored = None
    if bool(first_scored.any()):
        positions = torch.arange(seq_len, device=device)
        scored = positions[None, :] >= first_scored.to(device, non_blocking=True)[:, None]
        y_scored = torch.where(scored, y, IGNORE_INDEX)
    else:
        y_scored = y
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        batch_loss = model(x, y_scored).detach()
    result = torch.zeros(3, device=device, dtype=torch.float64)
    result[0] = batch_loss.to(torch.float64) * scored_count
    result[1] = scored_count
    if luts is not None:
        result[2] = count_target_bytes(x, y, luts, scored)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
