"""Samples during training: what the model writes after a few fixed prompts, greedy and sampled.

Every `trainer.sample_every` steps (and at the end) rank 0 continues each of `trainer.sample_prompts`
by `trainer.sample_tokens` tokens twice: greedily and at `trainer.sample_temperature` (seeded with the
run's seed, so two runs of one config write the same samples). Each prompt is read as a document
opening (the tokenizer's document token first, as every document in the shards begins), and the text
is the decoded continuation alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from speedrun.data.tokenizer import Tokenizer
from speedrun.generate import generate
from speedrun.models.protocol import can_generate, has_kv_cache

log = logging.getLogger("speedrun")


@dataclass
class Sampler:
    model: nn.Module
    tokenizer: Tokenizer
    prompts: Sequence[str]
    max_new_tokens: int
    temperature: float
    seed: int

    def samples(self) -> list[dict]:
        """One row per prompt and mode: `{"prompt", "temperature", "text"}` (temperature 0: greedy)."""
        rows = []
        for index, prompt in enumerate(self.prompts):
            for temperature in (0.0, self.temperature):
                # Seeded per prompt, so that prompts do not share their random draws.
                text = continuation(
                    self.model, self.tokenizer, prompt, self.max_new_tokens,
                    temperature=temperature, seed=self.seed + index,
                )  # fmt: skip
                rows.append({"prompt": prompt, "temperature": temperature, "text": text})
        return rows


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt as a document opening: the document token (when the tokenizer has one), then its text."""
    start = [] if tokenizer.document_start_id is None else [tokenizer.document_start_id]
    return start + tokenizer.encode_batch([prompt])[0]


def continuation(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **generate_args
) -> str:
    """The text the model writes after `prompt`: the whole sequence decoded, less the prompt's own text
    (decoding the new tokens alone could drop or add a space where they join the prompt)."""
    ids = prompt_ids(tokenizer, prompt)
    new_ids = generate(model, ids, max_new_tokens, vocab_size=tokenizer.vocab_size, **generate_args)
    prompt_text, whole = tokenizer.decode(ids), tokenizer.decode(ids + new_ids)
    return whole[len(prompt_text) :] if whole.startswith(prompt_text) else whole


def build_sampler(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> Sampler | None:
    """The trainer's sampler, or None (with one log line saying why) when this run cannot sample."""
    if tokenizer is None:
        log.info("samples: off, the data has no tokenizer to read prompts and write text (data.tokenizer)")
        return None
    if not can_generate(model):
        log.info("samples: off, %s has no logits() method to sample from", type(model).__name__)
        return None
    if not has_kv_cache(model):
        log.info(
            "samples: %s has no key/value cache; each token recomputes the whole sequence",
            type(model).__name__,
        )
    return Sampler(model, tokenizer, list(prompts), max_new_tokens, temperature, seed)


def sample_log_lines(step: int, rows: list[dict]) -> list[str]:
    """`samples step 200 | greedy | 'def f(x):' -> '\\n    return x'`: one line per sample, text quoted."""
    lines = []
    for row in rows:
        mode = "greedy" if row["temperature"] == 0 else f"temperature {row['temperature']:g}"
        lines.append(f"samples step {step} | {mode} | {row['prompt']!r} -> {row['text']!r}")
    return lines
