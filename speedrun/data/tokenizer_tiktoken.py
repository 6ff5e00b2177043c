"""Byte-level BPE in tiktoken's style: GPT-2's tokenizer (modded-nanogpt's task) and tiktoken rank files.

A rank file (`*.tiktoken`, tiktoken's own format: one `base64(token bytes) rank` per line) holds the
mergeable tokens; text is split with GPT-2's pattern before merging, and `<|endoftext|>` follows the last
rank, as in GPT-2 (id 50256), where it opens every document of modded-nanogpt's shards.

GPT-2's files are not in the tiktoken package (it downloads them on first use), and training machines are
often offline, so `gpt2` is read from `vocab.bpe` and `encoder.json` in `gpt2_folder()`, checked against
the sha256 sums tiktoken itself pins for them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from speedrun.data.paths import cache_root
from speedrun.data.tokenizer import GPT2_NAME, TokenBytes, Tokenizer, TokenizerError, file_sha256

GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# What tiktoken_ext.openai_public.gpt2() expects of the two files.
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TiktokenTokenizer(Tokenizer):
    """Mergeable ranks plus GPT-2's split pattern and `<|endoftext|>` after the last rank."""

    kind = "tiktoken"
    suffix = ".tiktoken"

    def __init__(self, ranks: dict[bytes, int], source: str) -> None:
        super().__init__(source)
        missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
        if missing_bytes:
            # tiktoken panics (an uncatchable Rust panic) on text it cannot spell in single bytes.
            raise TokenizerError(
                f"tokenizer {source}: {len(missing_bytes)} of the 256 single bytes have no rank "
                "(a byte-level BPE needs them all)"
            )
        self.ranks = ranks
        self.endoftext_id = max(ranks.values()) + 1
        try:
            self.encoding = tiktoken.Encoding(
                Path(source).stem,
                pat_str=r50k_pat_str,
                mergeable_ranks=ranks,
                special_tokens={ENDOFTEXT: self.endoftext_id},
            )
        except ValueError as error:  # e.g. two tokens with one rank
            raise TokenizerError(f"tokenizer {source}: not a usable tiktoken vocabulary ({error})") from None

    @property
    def vocab_size(self) -> int:
        return int(self.encoding.n_vocab)

    @property
    def document_start_id(self) -> int | None:
        return self.endoftext_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: prepare runs one process per core already.
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids if int(i) != self.endoftext_id])

    def token_bytes(self) -> TokenBytes:
        table = TokenBytes.empty(self.vocab_size)
        for token, rank in self.ranks.items():  # special tokens keep 0 bytes and stay boundaries
            table.base[rank] = len(token)
            table.boundary[rank] = False
        return table

    def rank_file_bytes(self) -> bytes:
        """The ranks in tiktoken's file format, in rank order (what `save` writes)."""
        lines = (
            base64.b64encode(token) + b" " + str(rank).encode()
            for token, rank in sorted(self.ranks.items(), key=lambda item: item[1])
        )
        return b"\n".join(lines) + b"\n"

    def fingerprint(self) -> str:
        # Of the content, not of a file: `gpt2` and the rank file `prepare` saves for it agree.
        return hashlib.sha256(self.rank_file_bytes()).hexdigest()

    def save(self, path: Path) -> None:
        path.write_bytes(self.rank_file_bytes())


def load_tiktoken_file(path: Path) -> TiktokenTokenizer:
    """A `*.tiktoken` rank file.

    Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that caches every path it reads in a
    temporary folder keyed by the path alone, so a file edited in place would be read stale.
    """
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"tokenizer {path}: line {number} is not `base64-token rank` (not a tiktoken rank file)"
            ) from None
    if not ranks:
        raise TokenizerError(f"tokenizer {path}: empty tiktoken rank file")
    return TiktokenTokenizer(ranks, str(path))


def gpt2_folder() -> Path:
    """Where `gpt2` is read from: `<speedrun cache>/tokenizers/gpt2/`."""
    return cache_root() / "tokenizers" / GPT2_NAME


def load_gpt2() -> TiktokenTokenizer:
    folder = gpt2_folder()
    missing = [name for name in GPT2_FILES if not (folder / name).is_file()]
    if missing:
        raise TokenizerError(
            f"GPT-2's tokenizer is not available offline: put {' and '.join(GPT2_FILES)} "
            f"(from {GPT2_URL}) into {folder}"
        )
    for name, expected in GPT2_FILES.items():
        if (actual := file_sha256(folder / name)) != expected:
            raise TokenizerError(
                f"{folder / name} is not GPT-2's {name} (sha256 {actual[:12]}..., expected {expected[:12]}...); "
                f"fetch it again from {GPT2_URL}"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(folder / "vocab.bpe"),
        str(folder / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
        encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    return TiktokenTokenizer(ranks, GPT2_NAME)
