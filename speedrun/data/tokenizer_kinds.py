"""Which tokenizer a name means: the one place that knows every kind (see speedrun/data/tokenizer.py)."""

from __future__ import annotations

import os
from pathlib import Path

from speedrun.data.tokenizer import GPT2_NAME, Tokenizer, TokenizerError


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer a user named: `gpt2`, or a path whose ending says its kind (table in the docstring)."""
    if str(spec) == GPT2_NAME:
        from speedrun.data.tokenizer_tiktoken import load_gpt2

        return load_gpt2()
    path = Path(spec)
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} not found")
    if path.suffix == ".model":
        from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    if path.suffix == ".tiktoken":
        from speedrun.data.tokenizer_tiktoken import load_tiktoken_file

        return load_tiktoken_file(path)
    if path.suffix == ".json":
        from speedrun.data.tokenizer_huggingface import HuggingFaceTokenizer

        return HuggingFaceTokenizer(path)
    raise TokenizerError(
        f"tokenizer {path}: unknown kind; give a SentencePiece .model, a tiktoken .tiktoken rank file, "
        f"a Hugging Face tokenizer .json, or {GPT2_NAME}"
    )
