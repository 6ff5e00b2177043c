"""Data sources: what `hydra.utils.instantiate(cfg.data)` returns.

A data source knows where its shards and tokenizer live and hands out the three things a run
needs: a train stream per rank, the validation tokens, and the tokenizer's byte tables.
`prepare()` runs once in the parent process, before any rank starts, so that a missing or
corrupt file is one clear error instead of N tracebacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from speedrun.data import DataError
from speedrun.data.shards import ShardError, list_shards, load_shard, read_shard_header
from speedrun.data.stdlib_corpus import build_stdlib_corpus, default_cache_dir
from speedrun.data.stream import DistributedTokenLoader
from speedrun.eval import build_byte_luts


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths mean the directory the user launched from, not Hydra's run folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(os.environ.get("SPEEDRUN_ORIG_CWD", os.getcwd())) / path


class DataSource:
    """The interface the trainer uses; subclasses say where the files are and how to make them."""

    seq_len: int
    val_tokens_limit: int  # 0 = the whole validation split
    tokenizer_label = "tokenizer"  # how errors name the tokenizer: the config key where the user sets it

    def __init__(self, seq_len: int, val_tokens: int):
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be positive")
        if val_tokens < 0:
            raise DataError(f"data.val_tokens={val_tokens} must be >= 0 (0 = the whole validation split)")
        self.seq_len = seq_len
        self.val_tokens_limit = val_tokens
        self._vocab_size: int | None = None

    # ---- where the files are (subclasses) ------------------------------------------------

    def train_files(self) -> list[Path]:
        raise NotImplementedError

    def val_files(self) -> list[Path]:
        raise NotImplementedError

    def tokenizer_path(self) -> Path:
        raise NotImplementedError

    def how_to_make(self) -> str:
        """The fix to quote when files are missing."""
        raise NotImplementedError

    def where_shards_are(self, split: str) -> str:
        """Where the `split` shards were looked for, for the error when there are none."""
        return f"next to {self.tokenizer_path()}"

    def prepare(self) -> None:
        """Build or check everything; raise DataError naming the culprit and the fix."""
        self._verify()

    def _verify(self) -> None:
        tokenizer = self.tokenizer_path()
        if not tokenizer.is_file():
            raise DataError(f"{self.tokenizer_label} {tokenizer} not found; {self.how_to_make()}")
        try:
            self.vocab_size()
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"tokenizer {tokenizer} is not a SentencePiece model ({e}); {self.how_to_make()}"
            ) from None
        for split, files in (("train", self.train_files()), ("val", self.val_files())):
            if not files:
                raise DataError(f"no {split} shards {self.where_shards_are(split)}; {self.how_to_make()}")
            for file in files:
                try:
                    read_shard_header(file)
                except ShardError as e:
                    raise DataError(str(e)) from None

    # ---- what a run uses -----------------------------------------------------------------

    def vocab_size(self) -> int:
        if self._vocab_size is None:
            sp = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path()))
            self._vocab_size = int(sp.vocab_size())
        return self._vocab_size

    def train_loader(self, rank: int, world_size: int, device: torch.device) -> DistributedTokenLoader:
        files = self.train_files()
        if not files:
            raise DataError(f"no train shards for {self.describe()}; was data.prepare() called?")
        return DistributedTokenLoader(files, rank, world_size, self.seq_len, device)

    def load_val_tokens(self) -> torch.Tensor:
        """The validation tokens (uint16, as the reference), cut to whole sequences plus one target."""
        files = self.val_files()
        if not files:
            raise DataError(f"no val shards for {self.describe()}; was data.prepare() called?")
        limit = self.val_tokens_limit
        parts: list[np.ndarray] = []
        total = 0
        for file in files:
            if limit and total >= limit:
                break  # enough tokens: do not touch the remaining shards
            try:
                tokens = load_shard(file)
            except ShardError as e:
                raise DataError(str(e)) from None
            parts.append(tokens[: limit - total] if limit else tokens)
            total += parts[-1].size
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
        usable = ((tokens.size - 1) // self.seq_len) * self.seq_len
        if usable <= 0:
            raise DataError(
                f"validation split has {tokens.size} tokens, fewer than one sequence of data.seq_len={self.seq_len} "
                "plus one; lower data.seq_len or raise data.val_tokens"
            )
        return torch.from_numpy(np.ascontiguousarray(tokens[: usable + 1]))

    def byte_luts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return build_byte_luts(self.tokenizer_path(), self.vocab_size(), device)

    def describe(self) -> str:
        return f"{type(self).__name__}(seq_len={self.seq_len}, val_tokens={self.val_tokens_limit})"

    def _token_counts(self) -> str:
        try:
            train = sum(read_shard_header(f) for f in self.train_files())
            val = sum(read_shard_header(f) for f in self.val_files())
        except ShardError:
            return "unreadable shards (prepare() names the bad file)"
        return f"{len(self.train_files())} train shards ({train:,} tokens), val {val:,} tokens"


class StdlibCorpus(DataSource):
    """The Python standard library's source, tokenized once into a local cache (no download)."""

    def __init__(
        self, seq_len: int = 256, val_tokens: int = 0, vocab_size: int = 1024, cache_dir: str | None = None
    ):
        super().__init__(seq_len, val_tokens)
        self.requested_vocab_size = vocab_size
        self.cache_dir = resolve_path(cache_dir) if cache_dir is not None else default_cache_dir(vocab_size)

    def how_to_make(self) -> str:
        return f"delete {self.cache_dir} and run again to rebuild it"

    def prepare(self) -> None:
        build_stdlib_corpus(self.cache_dir, self.requested_vocab_size)
        self._verify()

    def train_files(self) -> list[Path]:
        return list_shards(self.cache_dir, "train")

    def val_files(self) -> list[Path]:
        return list_shards(self.cache_dir, "val")

    def tokenizer_path(self) -> Path:
        return self.cache_dir / f"stdlib_{self.requested_vocab_size}_bpe.model"

    def describe(self) -> str:
        if not self.tokenizer_path().is_file():
            return f"stdlib corpus {self.cache_dir} (not built yet)"
        return (
            f"stdlib corpus {self.cache_dir}: {self._token_counts()}, vocab {self.vocab_size()}, "
            f"seq_len {self.seq_len}, val_tokens {self.val_tokens_limit or 'all'}"
        )


class ShardDataset(DataSource):
    """Any prepared folder of `*_train_*.bin` / `*_val_*.bin` shards plus a SentencePiece model."""

    tokenizer_label = "data.tokenizer"

    def __init__(
        self,
        path: str,
        tokenizer: str,
        seq_len: int = 1024,
        val_tokens: int = 0,
        train_pattern: str = "*_train_*.bin",
        val_pattern: str = "*_val_*.bin",
    ):
        super().__init__(seq_len, val_tokens)
        self.path = resolve_path(path)
        self.tokenizer = resolve_path(tokenizer)
        self.train_pattern = train_pattern
        self.val_pattern = val_pattern

    def how_to_make(self) -> str:
        return f"`python -m speedrun.prepare --input TEXT... --output {self.path} --vocab-size N` makes one"

    def prepare(self) -> None:
        if not self.path.is_dir():
            raise DataError(f"data.path {self.path} is not a folder; {self.how_to_make()}")
        self._verify()

    def where_shards_are(self, split: str) -> str:
        pattern = self.train_pattern if split == "train" else self.val_pattern
        return f"matching {pattern!r} in {self.path}"

    def train_files(self) -> list[Path]:
        return sorted(self.path.glob(self.train_pattern))

    def val_files(self) -> list[Path]:
        return sorted(self.path.glob(self.val_pattern))

    def tokenizer_path(self) -> Path:
        return self.tokenizer

    def describe(self) -> str:
        if not self.path.is_dir():
            return f"shards {self.path} (missing)"
        return (
            f"shards {self.path}: {self._token_counts()}, tokenizer {self.tokenizer.name}, "
            f"seq_len {self.seq_len}, val_tokens {self.val_tokens_limit or 'all'}"
        )


class FinewebSP1024(ShardDataset):
    """parameter-golf's FineWeb 10B export with its 1024-token SentencePiece tokenizer."""

    def __init__(
        self,
        path: str = "data/datasets/fineweb10B_sp1024",
        tokenizer: str = "data/tokenizers/fineweb_1024_bpe.model",
        seq_len: int = 1024,
        val_tokens: int = 0,
    ):
        super().__init__(path, tokenizer, seq_len, val_tokens, "fineweb_train_*.bin", "fineweb_val_*.bin")

    def how_to_make(self) -> str:
        return "download it with `python -m speedrun.data.fineweb --variant sp1024 --train-shards N`"
