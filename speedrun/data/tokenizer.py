"""Tokenizers behind one interface: what shards are encoded with and what bits-per-byte counts bytes with.

Three kinds, chosen by what the user names (`data.tokenizer`, `prepare --tokenizer`):

| name                          | kind                                                                  |
| ----------------------------- | --------------------------------------------------------------------- |
| `*.model`                     | SentencePiece (parameter-golf's tokenizers, the embedded corpus's)    |
| `*.tiktoken`                  | a tiktoken rank file: byte-level BPE with GPT-2's split pattern       |
| `gpt2`                        | GPT-2's byte-level BPE (tiktoken), from local files (`gpt2_folder()`) |
| `*.json` (`tokenizer.json`)   | a Hugging Face `tokenizers` file (byte-level or Metaspace BPE)        |

Every kind says how many UTF-8 bytes of text each token stands for (`TokenBytes`), under its own rules
(a SentencePiece piece's leading '▁' is a space except after a boundary token; a byte-level token is its
bytes; special tokens are no text at all), so that val_bpb means the same thing whichever tokenizer a run
uses. No kind imports torch: preparing a corpus does not need it.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

from speedrun.data.shards import MAX_TOKEN_ID, TOKEN_DTYPE

GPT2_NAME = "gpt2"
# Each piece of a long document is encoded on its own (see split_long_text): tokenizers build per-character
# structures over the whole string they are given, so a 30 MB one-line document would cost gigabytes.
MAX_PIECE_CHARS = 1 << 18


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class TokenBytes:
    """The UTF-8 bytes of text each token id stands for, as arrays indexed by token id.

    A target token `t` that follows token `p` stands for `base[t] + (leading_space[t] and not boundary[p])`
    bytes: SentencePiece's leading '▁' is a space except right after a boundary (BOS and other control
    tokens), where it is the dummy prefix rather than text. Byte-level kinds have no such space:
    `leading_space` is all False and each token is simply its bytes. Boundary tokens stand for 0 bytes.
    """

    base: np.ndarray  # int16
    leading_space: np.ndarray  # bool
    boundary: np.ndarray  # bool

    @classmethod
    def empty(cls, vocab_size: int) -> TokenBytes:
        """Every id a 0-byte boundary until the tokenizer says otherwise (ids it leaves unused stay so)."""
        return cls(np.zeros(vocab_size, np.int16), np.zeros(vocab_size, bool), np.ones(vocab_size, bool))

    def as_tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base, leading_space, boundary) as torch tensors on `device`: what evaluation indexes."""
        import torch  # here, not at the top: preparing a corpus must not pay for importing torch

        return tuple(torch.from_numpy(a).to(device) for a in (self.base, self.leading_space, self.boundary))


class Tokenizer(ABC):
    """One tokenizer, whatever its kind. `source` is what the user named: a path, or `gpt2`."""

    kind: ClassVar[str]  # "sentencepiece", "tiktoken" or "huggingface"
    suffix: ClassVar[str]  # the file name ending this kind is recognised by, and saved with

    def __init__(self, source: str) -> None:
        self.source = source

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids are 0 .. vocab_size - 1 (special tokens included)."""

    @property
    @abstractmethod
    def document_start_id(self) -> int | None:
        """The token that opens every document in a shard (SentencePiece's BOS, GPT-2's <|endoftext|>)."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, as plain text: a special token's spelling inside a text is text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids, special tokens left out."""

    @abstractmethod
    def token_bytes(self) -> TokenBytes:
        """The byte tables bits-per-byte uses (vocab_size entries)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 identifying the tokenizer's content: a prepared corpus's manifest records it."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the file that `speedrun.data.tokenizer_kinds.load_tokenizer(path)` reads back as this tokenizer."""

    def describe(self) -> str:
        return f"{self.kind} {self.source} (vocab {self.vocab_size:,})"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_long_text(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters, at line ends where it can be.

    Pieces are encoded separately, so no token spans a cut: a long document's tokens may differ from
    encoding it whole at a few places per megabyte, while its text (and byte count) is unchanged. A line
    longer than `max_chars` is cut at its last space, or at `max_chars` when it has none.
    """
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start, end) + 1  # after the newline: 0 when there is none
        if cut <= start:
            cut = text.rfind(" ", start + 1, end)  # before the space, which opens the next word
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[tuple[str, bool]]) -> np.ndarray:
    """Encode (text, opens_a_document) pieces into one uint16 array, a document start token before each
    document (parameter-golf's and modded-nanogpt's layout: no end token)."""
    start_id = tokenizer.document_start_id
    if start_id is None:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has no document start token (BOS, <|endoftext|>) to separate documents"
        )
    if tokenizer.vocab_size > MAX_TOKEN_ID + 1:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size:,} tokens; uint16 shards hold at most 65,536"
        )
    encoded = tokenizer.encode_batch([text for text, _ in pieces])
    starts = sum(opens for _, opens in pieces)
    tokens = np.empty(starts + sum(len(ids) for ids in encoded), dtype=TOKEN_DTYPE)
    position = 0
    for (_, opens), ids in zip(pieces, encoded, strict=True):
        if opens:
            tokens[position] = start_id
            position += 1
        tokens[position : position + len(ids)] = ids
        position += len(ids)
    return tokens


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Whole documents, each opened by the document start token; long ones encoded piece by piece."""
    return encode_pieces(
        tokenizer, [(piece, i == 0) for text in texts for i, piece in enumerate(split_long_text(text))]
    )
