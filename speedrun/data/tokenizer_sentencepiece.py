"""SentencePiece: the tokenizer kind parameter-golf uses, and training one the way parameter-golf does.

Training settings follow parameter-golf's FineWeb tokenizers (BPE, byte fallback, split digits, no dummy
prefix, pad/bos/eos/unk = 0/1/2/3) with one deliberate change: identity normalization and no whitespace
collapsing, so that decode(encode(text)) == text byte for byte. That keeps val_bpb honest (bytes are the
corpus's bytes, not NFKC-normalised ones) and keeps code indentation intact.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from speedrun.data.tokenizer import TokenBytes, Tokenizer, TokenizerError, file_sha256

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Characters seen in fewer than 0.05% of the sample get no piece of their own and are spelled with byte
# pieces instead; 1.0 would let a few rare scripts eat a small vocab (or make it impossible).
CHARACTER_COVERAGE = 0.9995
# Training text is cut at line ends into chunks of about this size; SentencePiece silently drops
# "sentences" longer than max_sentence_length, so that is set well above it (a single long line).
CHUNK_BYTES = 4096
MAX_SENTENCE_BYTES = 4 * CHUNK_BYTES


def training_chunks(text_iter: Iterable[str], max_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Documents cut at line ends into "sentences" under `max_bytes`, newlines kept.

    SentencePiece trains on sentences, not whole documents. Keeping the newlines lets it learn
    pieces such as `:\n` (useful for code), and cutting only at line ends keeps every byte.
    Whitespace-only chunks teach nothing and are dropped.
    """
    for text in text_iter:
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if chunk and size + len(line) > max_bytes:
                joined = "".join(chunk)
                if joined.strip():
                    yield joined
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        joined = "".join(chunk)
        if joined.strip():
            yield joined


def train_sentencepiece(
    text_iter: Iterable[str],
    model_prefix: Path,
    vocab_size: int,
    *,
    max_sentences: int = 2_000_000,
    threads: int = 2,
) -> Path:
    """Train a BPE tokenizer on (a bounded sample of) `text_iter`; return the path of `<model_prefix>.model`.

    `text_iter` yields documents; at most `max_sentences` chunks of them (`training_chunks`) are read,
    so a generator over a huge corpus is safe. The caller should still pass a sample (tens of MB at most):
    SentencePiece holds everything it reads in memory. Writes `<model_prefix>.model` and `.vocab`, each
    atomically. Raises ValueError with a one-line explanation when the text cannot support `vocab_size`.
    """
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = itertools.islice(training_chunks(text_iter), max_sentences)
    first = next(lines, None)
    if first is None:
        raise ValueError("no text to train the tokenizer on (every document is empty)")
    # Train under a temporary prefix and rename, so an interrupted run never leaves a half-written model.
    tmp_prefix = model_prefix.with_name(f".{model_prefix.name}.tmp{os.getpid()}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_prefix=str(tmp_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=CHARACTER_COVERAGE,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            input_sentence_size=max_sentences,
            # The caller bounds the sample; no shuffling keeps the tokenizer a pure function of the text.
            shuffle_input_sentence=False,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads,
            minloglevel=2,  # its INFO log is a page per run; errors still raise
        )
    except RuntimeError as error:
        for suffix in (".model", ".vocab"):
            _with_suffix(tmp_prefix, suffix).unlink(missing_ok=True)
        raise _vocab_error(str(error), vocab_size) from None
    for suffix in (".vocab", ".model"):
        os.replace(_with_suffix(tmp_prefix, suffix), _with_suffix(model_prefix, suffix))
    return _with_suffix(model_prefix, ".model")


def _with_suffix(prefix: Path, suffix: str) -> Path:
    # Not Path.with_suffix: a prefix such as "fineweb_1024.v2" already has a dot in its name.
    return prefix.with_name(prefix.name + suffix)


def _vocab_error(message: str, vocab_size: int) -> ValueError:
    """Turn SentencePiece's assertion text into one line that says what to change."""
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return ValueError(
            f"corpus too small for vocab {vocab_size}: its sample supports at most {too_high.group(1)} pieces; "
            "use a smaller --vocab-size or give more text"
        )
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return ValueError(
            f"vocab {vocab_size} is too small for this corpus: 256 byte pieces, the special tokens and its "
            f"common characters need at least {too_low.group(1)}; use a larger --vocab-size"
        )
    return ValueError(
        f"SentencePiece training failed for vocab {vocab_size}: {message.strip().splitlines()[-1]}"
    )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file."""

    kind = "sentencepiece"
    suffix = ".model"

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer {self.path} not found")
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError):
            raise TokenizerError(
                f"tokenizer {self.path} is not a SentencePiece .model file (corrupt or wrong format)"
            ) from None

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    @property
    def document_start_id(self) -> int | None:
        bos = int(self.processor.bos_id())
        return bos if bos >= 0 else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def token_bytes(self) -> TokenBytes:
        sp = self.processor
        table = TokenBytes.empty(self.vocab_size)
        for token_id in range(self.vocab_size):
            if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
                continue  # a boundary: no text
            table.boundary[token_id] = False
            if sp.is_byte(token_id):  # byte fallback: <0xNN> is one byte of text
                table.base[token_id] = 1
                continue
            piece = sp.id_to_piece(token_id)
            if piece.startswith("\u2581"):
                table.leading_space[token_id] = True
                piece = piece[1:]
            table.base[token_id] = len(piece.encode("utf-8"))
        return table

    def fingerprint(self) -> str:
        return file_sha256(self.path)

    def save(self, path: Path) -> None:
        if not (path.exists() and path.samefile(self.path)):
            shutil.copyfile(self.path, path)
