"""Data sources: what `hydra.utils.instantiate(cfg.data)` returns.

A data source knows where its shards and tokenizer live and hands out what a run needs: a train stream per
rank, the validation tokens, and the tokenizer's byte tables. `prepare()` runs once in the parent process,
before any rank starts, so that a missing or corrupt file is one clear error instead of N tracebacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from speedrun.data import DataError
from speedrun.data.checks import check_token_ids, check_tokenizer_matches_manifest, recorded_tokenizer
from speedrun.data.paths import resolve_path
from speedrun.data.shards import ShardError, list_shards, load_shard, read_shard_header
from speedrun.data.stdlib_corpus import build_stdlib_corpus, default_cache_dir
from speedrun.data.stream import DistributedTokenLoader
from speedrun.data.tokenizer import GPT2_NAME, Tokenizer, TokenizerError
from speedrun.data.tokenizer_kinds import load_tokenizer

log = logging.getLogger(__name__)

NO_TOKENIZER_NOTE = (
    "no data.tokenizer: val_bpb will be null and only val_loss is measured "
    "(set data.tokenizer to the shards' tokenizer for bits per byte)"
)


class DataSource:
    """The interface the trainer uses; subclasses say where the files are and how to make them.

    In the order a run uses it:
    - `prepare(model_vocab_size)`: once, in the parent process, before any rank starts. Builds what is
      missing (the embedded corpus) and checks everything: shard headers and sizes, the tokenizer loads and
      is the one the folder's manifest.json records, every token id fits the tokenizer's vocabulary and
      `model_vocab_size`. Raises DataError, one line naming the file and the fix.
    - `describe()`: one line for the log.
    - `vocab_size()`: the tokenizer's vocabulary, or None when the data has no tokenizer.
    - `check_model_vocab(n)`: refuses a model whose embedding (n rows) cannot hold every token id; a
      larger n than the tokenizer's vocabulary is padding (modded-nanogpt pads GPT-2's 50,257 to 50,304).
      Without a tokenizer it compares n with the largest id in the shards (`check_token_ids(n)`; the
      largest id of each shard is cached, see checks.py, so every rank may call it).
    - `tokenizer_path()`: what `data.tokenizer` names (a path, `gpt2`, or None), for messages.
    - `train_loader(rank, world_size, device)`, `load_val_tokens()`: the token streams.
    - `byte_luts(device)`: the tables bits-per-byte counts bytes with, or None without a tokenizer (then
      evaluation reports val_bpb as None).
    """

    seq_len: int
    val_tokens_limit: int  # targets scored; 0 = the whole validation split
    tokenizer_label = "data.tokenizer"  # how errors name the tokenizer: the config key where the user sets it

    def __init__(self, seq_len: int, val_tokens: int, allow_tokenizer_mismatch: bool = False):
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be positive")
        if val_tokens < 0:
            raise DataError(f"data.val_tokens={val_tokens} must be >= 0 (0 = the whole validation split)")
        self.seq_len = seq_len
        self.val_tokens_limit = val_tokens
        self.allow_tokenizer_mismatch = allow_tokenizer_mismatch
        self._tokenizer: Tokenizer | None = None

    # ---- where the files are (subclasses) ------------------------------------------------

    def train_files(self) -> list[Path]:
        raise NotImplementedError

    def val_files(self) -> list[Path]:
        raise NotImplementedError

    def tokenizer_path(self) -> Path | str | None:
        """A path, `gpt2`, or None (no tokenizer)."""
        raise NotImplementedError

    def shard_folder(self) -> Path:
        """The folder whose manifest.json (if any) records the tokenizer the shards were made with."""
        raise NotImplementedError

    def how_to_make(self) -> str:
        """The fix to quote when files are missing."""
        raise NotImplementedError

    def where_shards_are(self, split: str) -> str:
        """Where the `split` shards were looked for, for the error when there are none."""
        return f"in {self.shard_folder()}"

    # ---- checks, once, in the parent ---------------------------------------------------------

    def prepare(self, model_vocab_size: int | None = None) -> None:
        """Build or check everything; raise DataError naming the culprit and the fix."""
        self._verify()
        self.check_token_ids(model_vocab_size)
        if model_vocab_size is not None:
            self.check_model_vocab(model_vocab_size)

    def _verify(self) -> None:
        """Every shard's header and size; the tokenizer loads and is the one the manifest records."""
        spec = self.tokenizer_path()
        if spec is not None and spec != GPT2_NAME and not Path(spec).is_file():
            raise DataError(f"{self.tokenizer_label} {spec} not found; {self.how_to_make()}")
        tokenizer = self.tokenizer()
        for split, files in (("train", self.train_files()), ("val", self.val_files())):
            if not files:
                raise DataError(f"no {split} shards {self.where_shards_are(split)}; {self.how_to_make()}")
            for file in files:
                try:
                    read_shard_header(file)
                except ShardError as e:
                    raise DataError(str(e)) from None
        if tokenizer is None:
            recorded = recorded_tokenizer(self.shard_folder())
            found = recorded is not None and recorded[0].is_file()
            log.info(
                NO_TOKENIZER_NOTE + (f"; these shards were prepared with {recorded[0]}" if found else "")
            )
            return
        warning = check_tokenizer_matches_manifest(
            self.shard_folder(), tokenizer, self.allow_tokenizer_mismatch
        )
        if warning:
            log.warning(warning)

    def check_token_ids(self, model_vocab_size: int | None = None) -> None:
        """Refuse the first shard holding an id the tokenizer's vocabulary (or, without a tokenizer, the
        model's embedding) does not have. Cheap after the first time: the largest ids are cached."""
        shards = [*self.train_files(), *self.val_files()]
        tokenizer = self.tokenizer()
        if tokenizer is not None:
            check_token_ids(
                shards,
                tokenizer.vocab_size,
                f"the tokenizer's vocab {tokenizer.vocab_size}",
                f"{self.tokenizer_label} {tokenizer.source} is not the tokenizer these shards were made with",
            )
        elif model_vocab_size is not None:
            check_token_ids(
                shards,
                model_vocab_size,
                f"model.vocab_size={model_vocab_size}",
                "raise model.vocab_size, or check that these shards are the ones meant",
            )

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding cannot hold every token id of this data: fewer rows than the
        tokenizer's vocabulary, or (without a tokenizer) than the shards' largest id needs."""
        vocab = self.vocab_size()
        if vocab is None:
            self.check_token_ids(model_vocab_size)
            return
        if vocab > model_vocab_size:
            raise DataError(
                f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocab {vocab} "
                f"({self.tokenizer_path()}); set model.vocab_size={vocab}"
            )
        if vocab < model_vocab_size:
            log.info(
                "model.vocab_size=%d pads the tokenizer's %d ids (%d embedding rows never used)",
                model_vocab_size, vocab, model_vocab_size - vocab,
            )  # fmt: skip

    # ---- what a run uses -----------------------------------------------------------------

    def tokenizer(self) -> Tokenizer | None:
        """The loaded tokenizer (once), or None when the data has none."""
        spec = self.tokenizer_path()
        if spec is None:
            return None
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(spec)
            except TokenizerError as e:
                # The error names the file; for `gpt2` it also says where the files go.
                fix = "" if spec == GPT2_NAME else f"; {self.how_to_make()}"
                raise DataError(f"{self.tokenizer_label}: {e}{fix}") from None
        return self._tokenizer

    def vocab_size(self) -> int | None:
        tokenizer = self.tokenizer()
        return None if tokenizer is None else tokenizer.vocab_size

    def train_loader(self, rank: int, world_size: int, device: torch.device) -> DistributedTokenLoader:
        files = self.train_files()
        if not files:
            raise DataError(f"no train shards for {self.describe()}; was data.prepare() called?")
        return DistributedTokenLoader(files, rank, world_size, self.seq_len, device)

    def load_val_tokens(self) -> torch.Tensor:
        """The validation tokens (uint16, as the reference), cut to whole sequences plus one target.

        With `val_tokens` N, the first N + 1 tokens: N targets, as modded-nanogpt counts its 10,485,760
        (rounded down to whole sequences).
        """
        files = self.val_files()
        if not files:
            raise DataError(f"no val shards for {self.describe()}; was data.prepare() called?")
        limit = self.val_tokens_limit + 1 if self.val_tokens_limit else 0
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

    def byte_luts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(base bytes, has leading space, is boundary) per token id, on `device`; None without a tokenizer."""
        tokenizer = self.tokenizer()
        if tokenizer is None:
            return None
        return tokenizer.token_bytes().as_tensors(device)

    def describe(self) -> str:
        return f"{type(self).__name__}(seq_len={self.seq_len}, val_tokens={self.val_tokens_limit})"

    def _token_counts(self) -> str:
        try:
            train = sum(read_shard_header(f) for f in self.train_files())
            val = sum(read_shard_header(f) for f in self.val_files())
        except ShardError:
            return "unreadable shards (prepare() names the bad file)"
        return f"{len(self.train_files())} train shards ({train:,} tokens), val {val:,} tokens"

    def _tokenizer_summary(self) -> str:
        tokenizer = self._tokenizer  # loaded by prepare(); describe() must not fail on its own
        if tokenizer is not None:
            return f"tokenizer {tokenizer.describe()}"
        return "no tokenizer (val_bpb null)" if self.tokenizer_path() is None else "tokenizer not loaded"


class StdlibCorpus(DataSource):
    """The Python standard library's source, tokenized once into a local cache (no download)."""

    tokenizer_label = "tokenizer"  # not a config key: the corpus builds its own

    def __init__(
        self, seq_len: int = 256, val_tokens: int = 0, vocab_size: int = 1024, cache_dir: str | None = None
    ):
        super().__init__(seq_len, val_tokens)
        self.requested_vocab_size = vocab_size
        self._cache_dir = resolve_path(cache_dir) if cache_dir is not None else None

    @property
    def cache_dir(self) -> Path:
        # Resolved when first needed, not when built: an unusable SPEEDRUN_CACHE is prepare()'s error.
        if self._cache_dir is None:
            self._cache_dir = default_cache_dir(self.requested_vocab_size)
        return self._cache_dir

    def how_to_make(self) -> str:
        return f"delete {self.cache_dir} and run again to rebuild it"

    def prepare(self, model_vocab_size: int | None = None) -> None:
        build_stdlib_corpus(self.cache_dir, self.requested_vocab_size)
        super().prepare(model_vocab_size)

    def train_files(self) -> list[Path]:
        return list_shards(self.cache_dir, "train")

    def val_files(self) -> list[Path]:
        return list_shards(self.cache_dir, "val")

    def tokenizer_path(self) -> Path:
        return self.cache_dir / f"stdlib_{self.requested_vocab_size}_bpe.model"

    def shard_folder(self) -> Path:
        return self.cache_dir

    def describe(self) -> str:
        if not self.tokenizer_path().is_file():
            return f"stdlib corpus {self.cache_dir} (not built yet)"
        return (
            f"stdlib corpus {self.cache_dir}: {self._token_counts()}, vocab {self.vocab_size()}, "
            f"seq_len {self.seq_len}, val_tokens {self.val_tokens_limit or 'all'}"
        )


class ShardDataset(DataSource):
    """Any folder of `*_train_*.bin` / `*_val_*.bin` shards, with its tokenizer (or none)."""

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        seq_len: int = 1024,
        val_tokens: int = 0,
        train_pattern: str = "*_train_*.bin",
        val_pattern: str = "*_val_*.bin",
        allow_tokenizer_mismatch: bool = False,
    ):
        super().__init__(seq_len, val_tokens, allow_tokenizer_mismatch)
        self.path = resolve_path(path)
        self.tokenizer_spec: Path | str | None = None
        if tokenizer is not None:  # `gpt2` names a tokenizer, not a file; anything else is a path
            self.tokenizer_spec = tokenizer if tokenizer == GPT2_NAME else resolve_path(tokenizer)
        self.train_pattern = train_pattern
        self.val_pattern = val_pattern

    def how_to_make(self) -> str:
        return f"`python -m speedrun.prepare --input TEXT... --output {self.path} --vocab-size N` makes one"

    def prepare(self, model_vocab_size: int | None = None) -> None:
        if not self.path.is_dir():
            raise DataError(f"data.path {self.path} is not a folder; {self.how_to_make()}")
        super().prepare(model_vocab_size)

    def where_shards_are(self, split: str) -> str:
        pattern = self.train_pattern if split == "train" else self.val_pattern
        return f"matching {pattern!r} in {self.path}"

    def train_files(self) -> list[Path]:
        return sorted(self.path.glob(self.train_pattern))

    def val_files(self) -> list[Path]:
        return sorted(self.path.glob(self.val_pattern))

    def tokenizer_path(self) -> Path | str | None:
        return self.tokenizer_spec

    def shard_folder(self) -> Path:
        return self.path

    def describe(self) -> str:
        if not self.path.is_dir():
            return f"shards {self.path} (missing)"
        return (
            f"shards {self.path}: {self._token_counts()}, {self._tokenizer_summary()}, "
            f"seq_len {self.seq_len}, val_tokens {self.val_tokens_limit or 'all'}"
        )


class FinewebSP1024(ShardDataset):
    """parameter-golf's FineWeb 10B export with its 1024-token SentencePiece tokenizer."""

    def __init__(
        self,
        path: str = "data/datasets/fineweb10B_sp1024",
        tokenizer: str | None = "data/tokenizers/fineweb_1024_bpe.model",
        seq_len: int = 1024,
        val_tokens: int = 0,
        allow_tokenizer_mismatch: bool = False,
    ):
        super().__init__(
            path, tokenizer, seq_len, val_tokens, "fineweb_train_*.bin", "fineweb_val_*.bin",
            allow_tokenizer_mismatch,
        )  # fmt: skip

    def how_to_make(self) -> str:
        return "download it with `python -m speedrun.data.fineweb --variant sp1024 --train-shards N`"


class FinewebGPT2(ShardDataset):
    """modded-nanogpt's FineWeb 10B, tokenized with GPT-2 (its task: val loss on the first 10,485,760 tokens).

    No tokenizer by default: the task is defined on the loss alone. `data.tokenizer=gpt2` adds val_bpb
    when GPT-2's files are in the cache (the error says where).
    """

    def __init__(
        self,
        path: str = "data/datasets/fineweb10B_gpt2",
        tokenizer: str | None = None,
        seq_len: int = 1024,
        val_tokens: int = 10_485_760,
        allow_tokenizer_mismatch: bool = False,
    ):
        super().__init__(
            path, tokenizer, seq_len, val_tokens, "fineweb_train_*.bin", "fineweb_val_*.bin",
            allow_tokenizer_mismatch,
        )  # fmt: skip

    def how_to_make(self) -> str:
        return "download it with `python -m speedrun.data.fineweb --variant gpt2 --train-shards N`"
