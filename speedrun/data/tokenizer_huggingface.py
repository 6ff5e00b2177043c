"""Hugging Face `tokenizer.json` files, and training a byte-level BPE with the `tokenizers` library.

Bits-per-byte needs the bytes each token stands for, which depends on how the file's decoder turns tokens
back into text. Two families cover the BPE tokenizers in use:
- byte-level (GPT-2, Llama 3, most new models; what `train_bytelevel` writes): every character of a token
  stands for one byte, through GPT-2's byte-to-character table;
- Metaspace (SentencePiece converted to tokenizers, e.g. Llama 2, T5): '▁' is a space and `<0xNN>` one
  byte of fallback, with SentencePiece's rule that a leading '▁' after a boundary token is not text.
Other decoders (WordPiece's `##`, CTC, ...) are refused in one line rather than counted wrongly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from speedrun.data.tokenizer import TokenBytes, Tokenizer, TokenizerError, file_sha256, split_long_text

# The special token that opens each document, first found wins: GPT-2's, then the usual BOS spellings.
DOCUMENT_START_TOKENS = ("<|endoftext|>", "<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[BOS]")
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
ENCODE_BATCH_CHARS = 1 << 18
# The trainer is fed texts cut to this size: it pre-tokenizes a whole text before counting its words, which
# for one 10 MB document would hold millions of pre-tokens at once.
TRAINING_PIECE_CHARS = 1 << 16


def bytes_to_unicode() -> dict[str, int]:
    """GPT-2's table from the characters byte-level tokens are written in back to the bytes they stand for.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft hyphen) are
    shifted to U+0100 and up, in byte order. `tokenizers` keeps this table inside its Rust code (only the
    alphabet is exposed), hence this copy; a test checks it against that alphabet and real encodings.
    """
    table: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        char = chr(byte)
        if char.isprintable() and char != " ":
            table[char] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` JSON file."""

    kind = "huggingface"
    suffix = ".json"

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        try:
            self.config = json.loads(self.path.read_text(encoding="utf-8"))
            self.tokenizer = HFTokenizer.from_file(str(self.path))
        except Exception as error:  # noqa: BLE001 - tokenizers reports a bad file as a plain Exception
            first = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise TokenizerError(
                f"tokenizer {self.path} is not a Hugging Face tokenizer.json ({first})"
            ) from None
        # A document that spells "<|endoftext|>" holds text, not a boundary (tiktoken's encode_ordinary).
        self.tokenizer.encode_special_tokens = True
        self.style, self.space_mark = _decoding_style(self.config.get("decoder"), self.path)
        self.special = {
            token_id: added.content
            for token_id, added in self.tokenizer.get_added_tokens_decoder().items()
            if added.special
        }

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def document_start_id(self) -> int | None:
        by_content = {content: token_id for token_id, content in self.special.items()}
        return next((by_content[t] for t in DOCUMENT_START_TOKENS if t in by_content), None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # A few hundred kilobytes of text per call: each token's Encoding (string, offsets, masks) costs
        # far more than its id, and only the ids are kept.
        ids: list[list[int]] = []
        for batch in _batches(texts, ENCODE_BATCH_CHARS):
            ids += [e.ids for e in self.tokenizer.encode_batch(batch, add_special_tokens=False)]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> TokenBytes:
        table = TokenBytes.empty(self.vocab_size)
        added = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items() if not t.special}
        byte_of = bytes_to_unicode()
        for token, token_id in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if token_id in self.special:
                continue  # no text: a boundary
            table.boundary[token_id] = False
            if token_id in added:  # matched and decoded as its literal content
                table.base[token_id] = len(added[token_id].encode("utf-8"))
            elif self.style == "bytelevel":
                try:
                    table.base[token_id] = len(bytes(byte_of[char] for char in token))
                except KeyError:
                    raise TokenizerError(
                        f"tokenizer {self.path}: token {token_id} ({token!r}) is not written in byte-level characters"
                    ) from None
            elif BYTE_FALLBACK.fullmatch(token):
                table.base[token_id] = 1
            else:
                if token.startswith(self.space_mark):
                    table.leading_space[token_id] = True
                    token = token[len(self.space_mark) :]
                table.base[token_id] = len(token.replace(self.space_mark, " ").encode("utf-8"))
        return table

    def fingerprint(self) -> str:
        return file_sha256(self.path)

    def save(self, path: Path) -> None:
        if not (path.exists() and path.samefile(self.path)):
            shutil.copyfile(self.path, path)


def _batches(texts: Sequence[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts grouped up to `max_chars` characters (a longer text goes alone)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        if batch and size + len(text) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


def _decoding_style(decoder: dict | None, path: Path) -> tuple[str, str]:
    """("bytelevel", "") or ("metaspace", its space character), from the file's decoder."""
    parts = decoder.get("decoders", []) if decoder and decoder.get("type") == "Sequence" else [decoder or {}]
    for part in parts:
        if part.get("type") == "ByteLevel":
            return "bytelevel", ""
        if part.get("type") == "Metaspace":
            return "metaspace", part.get("replacement", "\u2581")
        pattern = (part.get("pattern") or {}).get("String")
        if part.get("type") == "Replace" and part.get("content") == " " and pattern:
            return "metaspace", pattern  # SentencePiece converted the Llama way: Replace('▁', ' ')
    kinds = "+".join(str(part.get("type")) for part in parts)
    raise TokenizerError(
        f"tokenizer {path}: its decoder ({kinds}) is neither byte-level nor Metaspace, so the bytes per "
        "token (for val_bpb) are not defined; use a byte-level or SentencePiece-style tokenizer"
    )


def train_bytelevel(texts: Iterable[str], path: Path, vocab_size: int) -> Path:
    """Train a GPT-2-style byte-level BPE (`<|endoftext|>` as id 0) on `texts`; write it to `path`.

    Like `train_sentencepiece`, the caller bounds the sample. Written atomically (temporary name, rename).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab {vocab_size} is too small for a byte-level BPE: its 256 byte tokens and <|endoftext|> "
            f"need at least {len(alphabet) + 1}; use a larger --vocab-size"
        )
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=alphabet,  # every byte has a token, whatever the sample holds
        show_progress=False,
    )
    pieces = (piece for text in texts for piece in split_long_text(text, TRAINING_PIECE_CHARS))
    tokenizer.train_from_iterator(pieces, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path
