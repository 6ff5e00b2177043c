"""Token generation: continue a prompt greedily or by sampling, with the model's key/value cache if it has one.

With a cache (speedrun/models/protocol.py: `new_kv_cache`) the prompt is read once and each new token
costs one position's work; without one the whole sequence is recomputed for every token, which gives
the same tokens, only more slowly. Sampling draws from its own seeded generator, so the same seed gives
the same text and the global RNG (which a resumed run restores bit for bit) is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from speedrun.models.protocol import new_kv_cache


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> list[int]:
    """The `max_new_tokens` ids that follow `prompt_ids` (not the prompt itself).

    temperature 0 picks the most likely token (greedy); above 0 tokens are drawn from the softmax of
    logits / temperature, restricted to the `top_k` most likely when given. `vocab_size` leaves out the
    logits of ids past the tokenizer's vocabulary (a vocabulary padded for speed: they are never text).
    The model needs `logits` (the protocol); the caller sets autocast if it wants it.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache = new_kv_cache(model, ids.size(1) + max_new_tokens) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        new_ids: list[Tensor] = []
        logits = model.logits(ids) if cache is None else model.logits(ids, kv_cache=cache)
        for _ in range(max_new_tokens):
            next_id = pick_token(logits[:, -1, :vocab_size], temperature, top_k, generator)
            new_ids.append(next_id)
            if cache is None:
                ids = torch.cat([ids, next_id], dim=1)
                logits = model.logits(ids)
            else:
                logits = model.logits(next_id, kv_cache=cache)
    finally:
        model.train(was_training)
    # One read-back at the end: no host-device round trip per token.
    return torch.cat(new_ids, dim=1)[0].tolist() if new_ids else []


def pick_token(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """The next token of each row of `logits` (batch, vocab), as a (batch, 1) tensor."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
