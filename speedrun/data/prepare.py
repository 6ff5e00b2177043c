"""Turn a text corpus into a tokenizer and token shards: `python -m speedrun.prepare`.

    python -m speedrun.prepare --input corpus.jsonl notes/ --output data/mine --vocab-size 1024
    python -m speedrun.prepare --input corpus.jsonl --output data/mine --train bytelevel --vocab-size 4096
    python -m speedrun.prepare --input corpus.jsonl --output data/mine --tokenizer gpt2

Inputs are `.txt` files (one document each), `.jsonl` / `.jsonl.gz` files (one document per line, in its
`text` field), or folders of those (read recursively, in sorted order). The corpus is streamed twice: once
for a bounded sample that trains the tokenizer (SentencePiece, or a byte-level BPE with `--train
bytelevel`; skipped with `--tokenizer`), once to encode every document, its start token first, into
`<prefix>_train_NNNNNN.bin` / `<prefix>_val_NNNNNN.bin` shards. Memory stays flat however large the corpus
or its documents: one preallocated shard buffer per split, a few chunks of text in flight, and documents
longer than 256K characters encoded a piece at a time (`split_long_text`).

Nothing is dropped silently: unreadable lines are skipped and counted by reason, undecodable bytes are
replaced with U+FFFD and the document counted as repaired, and both are reported on stderr and in
`manifest.json`, which is written last. Shards appear in the output folder only once every document has
been encoded, so an interrupted run leaves nothing a training run would accept.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from speedrun.cli import Parser, fraction
from speedrun.data.checks import MANIFEST_NAME
from speedrun.data.shards import MAX_TOKEN_ID, TOKEN_DTYPE, list_shards, write_shard
from speedrun.data.tokenizer import (
    GPT2_NAME,
    Tokenizer,
    TokenizerError,
    encode_pieces,
    split_long_text,
)
from speedrun.data.tokenizer_kinds import load_tokenizer
from speedrun.signals import ignore_interrupts, sigterm_raises

SPLITS = ("val", "train")
TOKENIZER_STEM = "tokenizer"  # tokenizer.model, tokenizer.tiktoken or tokenizer.json, by kind
TRAINERS = ("sentencepiece", "bytelevel")
STAGING_NAME = ".prepare-partial"  # shards wait here until the whole corpus is encoded
CHUNK_CHARS = 1 << 20  # text is sent to workers ~1 MB at a time
EXAMPLES_KEPT = 5  # per skip reason, the first few places are reported
SKIP_REASONS = {
    "not_json": "lines that are not JSON",
    "no_text_field": "JSON lines without a 'text' field",
    "text_not_string": "JSON lines whose 'text' is not a string",
    "empty": "empty documents",
}


class PrepareError(Exception):
    """Bad input or usage: printed as one `error:` line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that it cleans up exactly as after Ctrl-C."""


# ---------------------------------------------------------------------------------------------------------
# Reading documents


@dataclass
class ReadReport:
    """Everything reading the inputs skipped or repaired, so that no loss goes unreported."""

    skipped: Counter[str] = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    repaired: int = 0
    repaired_examples: list[str] = field(default_factory=list)
    bytes_read: int = 0  # of the input files as stored (compressed for .gz), for the progress line

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_KEPT:
            examples.append(where)

    def repair(self, where: str) -> None:
        self.repaired += 1
        if len(self.repaired_examples) < EXAMPLES_KEPT:
            self.repaired_examples.append(where)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per kind of problem."""
        out = [
            f"skipped {count} {SKIP_REASONS[reason]} (e.g. {', '.join(self.skipped_examples[reason])})"
            for reason, count in sorted(self.skipped.items())
        ]
        if self.repaired:
            out.append(
                f"repaired {self.repaired} documents with undecodable UTF-8 (bytes replaced by U+FFFD; "
                f"e.g. {', '.join(self.repaired_examples)})"
            )
        return out


def discover_inputs(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Expand --input into the ordered files to read, plus the files found in folders but not readable."""
    files: list[Path] = []
    ignored: list[Path] = []
    for path in paths:
        if not path.exists():
            raise PrepareError(f"input {path} does not exist")
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                (files if _is_corpus_file(child) else ignored).append(child)
        elif _is_corpus_file(path):
            files.append(path)
        else:
            raise PrepareError(
                f"input {path}: unsupported file type; give .txt, .jsonl, .jsonl.gz files or folders"
            )
    if not files:
        raise PrepareError(f"no .txt, .jsonl or .jsonl.gz files in {', '.join(map(str, paths))}")
    return files, ignored


def _is_corpus_file(path: Path) -> bool:
    return path.name.endswith((".txt", ".jsonl", ".jsonl.gz"))


def iter_documents(files: Iterable[Path], report: ReadReport) -> Iterator[str]:
    """Yield every document of the inputs, in order, recording what was skipped or repaired."""
    done_bytes = 0
    for path in files:
        if path.name.endswith(".txt"):
            text = _decode(path.read_bytes(), str(path), report)
            if text.strip():
                yield text
            else:
                report.skip("empty", str(path))
        else:
            with open(path, "rb") as raw:
                try:
                    stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
                    for number, line in enumerate(stream, start=1):
                        report.bytes_read = done_bytes + raw.tell()
                        text = _parse_jsonl_line(line, f"{path}:{number}", report)
                        if text is not None:
                            yield text
                except (OSError, EOFError, zlib.error) as error:
                    raise PrepareError(f"input {path}: cannot read it as gzip ({error})") from None
        done_bytes += path.stat().st_size
        report.bytes_read = done_bytes


def _parse_jsonl_line(line: bytes, where: str, report: ReadReport) -> str | None:
    if not line.strip():
        return None  # a blank line holds no document: nothing is lost
    try:
        record = json.loads(_decode(line, where, report))
    except json.JSONDecodeError:
        report.skip("not_json", where)
        return None
    if not isinstance(record, dict) or "text" not in record:
        report.skip("no_text_field", where)
        return None
    text = record["text"]
    if not isinstance(text, str):
        report.skip("text_not_string", where)
        return None
    if not text.strip():
        report.skip("empty", where)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON can escape lone surrogates ("\ud800"), which UTF-8 cannot hold
        report.repair(where)
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _decode(data: bytes, where: str, report: ReadReport) -> str:
    # Replacing a stray byte keeps the rest of the document; skipping would lose all of it.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        report.repair(where)
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------
# Validation split


@dataclass(frozen=True)
class ValSplit:
    """Which documents are validation: the first K (parameter-golf's convention) or a stable hash share."""

    first_docs: int | None = None
    fraction: float | None = None

    def is_val(self, index: int, text: str) -> bool:
        if self.first_docs is not None:
            return index < self.first_docs
        # By content, not position: the same document lands in the same split however the inputs are
        # ordered, and duplicates cannot straddle train and validation.
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self.fraction * 2**64

    def describe(self) -> dict:
        if self.first_docs is not None:
            return {"rule": "first_documents", "documents": self.first_docs}
        return {"rule": "content_hash", "fraction": self.fraction}


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class SampleStats:
    documents_seen: int = 0
    documents: int = 0
    bytes: int = 0


def tokenizer_sample(
    docs: Iterator[str], split: ValSplit, max_docs: int | None, max_bytes: int, stats: SampleStats
) -> Iterator[str]:
    """The first training documents, up to the sample limits (validation text never trains the tokenizer).

    The document that reaches `max_bytes` is cut there: tokenizer trainers hold their whole sample in
    memory, several times over, so one 30 MB document must not become a 30 MB sample.
    """
    for index, text in enumerate(docs):
        stats.documents_seen += 1
        if split.is_val(index, text):
            continue
        remaining = max_bytes - stats.bytes
        if len(text) > remaining:  # characters >= bytes / 4: a cheap bound before encoding it
            text = text.encode("utf-8")[:remaining].decode("utf-8", errors="ignore")
        yield text
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        if stats.bytes >= max_bytes or (max_docs is not None and stats.documents >= max_docs):
            return


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int | None) -> None:
    """Refuse a tokenizer shards cannot be made with, naming it and the fix."""
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise PrepareError(
            f"--tokenizer {tokenizer.source} has vocab {tokenizer.vocab_size} but --vocab-size is {vocab_size}; "
            "drop --vocab-size or make them agree"
        )
    if tokenizer.vocab_size > MAX_TOKEN_ID + 1:
        raise PrepareError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size:,} tokens; uint16 shards hold at most "
            f"{MAX_TOKEN_ID + 1:,}: use a tokenizer with a smaller vocabulary"
        )
    if tokenizer.document_start_id is None:
        raise PrepareError(
            f"tokenizer {tokenizer.source} has no token to open documents with (BOS, <|endoftext|>, <s>); "
            "add one as a special token"
        )


def _load(spec: str | Path) -> Tokenizer:
    try:
        return load_tokenizer(spec)
    except TokenizerError as error:
        raise PrepareError(str(error)) from None


# ---------------------------------------------------------------------------------------------------------
# Encoding


def document_chunks(docs: Iterator[str], split: ValSplit) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """Group documents into ~CHUNK_CHARS chunks of (text, opens_a_document) pieces, one open chunk per
    split, so each split keeps its order; a long document is cut into pieces (`split_long_text`)."""
    chunks: dict[str, list[tuple[str, bool]]] = {name: [] for name in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for index, text in enumerate(docs):
        name = "val" if split.is_val(index, text) else "train"
        for number, piece in enumerate(split_long_text(text)):
            chunks[name].append((piece, number == 0))
            sizes[name] += len(piece)
            if sizes[name] >= CHUNK_CHARS:
                yield name, chunks[name]
                chunks[name], sizes[name] = [], 0
    for name in SPLITS:
        if chunks[name]:
            yield name, chunks[name]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_file: str) -> None:
    # Each worker loads the tokenizer once, not once per chunk; Ctrl-C is the parent's to handle.
    ignore_interrupts()
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_file)


def _encode_chunk(pieces: list[tuple[str, bool]]) -> np.ndarray:
    return encode_pieces(_worker_tokenizer, pieces)


def encode_chunks(
    chunks: Iterator[tuple[str, list[tuple[str, bool]]]], tokenizer_file: Path, workers: int
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Encode chunks in order with `workers` processes; yield (split, documents begun, tokens) per chunk.

    Not Pool.imap: it reads its input as fast as it can, so a slow pool would let the whole corpus pile up
    in memory. Here at most 2 chunks per worker are in flight.
    """
    if workers == 1:
        tokenizer = load_tokenizer(tokenizer_file)
        for name, pieces in chunks:
            yield name, sum(opens for _, opens in pieces), encode_pieces(tokenizer, pieces)
        return
    # spawn, not fork: workers start clean whatever the parent holds (threads, the heap left by tokenizer
    # training), and behave the same on every platform.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_file),)) as pool:
        in_flight: deque = deque()
        for name, pieces in chunks:
            documents = sum(opens for _, opens in pieces)
            in_flight.append((name, documents, pool.apply_async(_encode_chunk, (pieces,))))
            if len(in_flight) >= 2 * workers:
                name, count, result = in_flight.popleft()
                yield name, count, result.get()
        while in_flight:
            name, count, result = in_flight.popleft()
            yield name, count, result.get()


class ShardWriter:
    """One split's tokens: a preallocated shard-sized buffer, written out as a shard each time it fills."""

    def __init__(self, folder: Path, prefix: str, split: str, shard_tokens: int) -> None:
        self.folder, self.prefix, self.split = folder, prefix, split
        # np.empty only reserves address space: pages become resident as tokens are written, so an
        # unused or small split costs nothing.
        self.buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self.fill = 0
        self.files: list[str] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += tokens.size
        position = 0
        while position < tokens.size:  # a document may straddle two shards, as in parameter-golf's export
            take = min(self.buffer.size - self.fill, tokens.size - position)
            self.buffer[self.fill : self.fill + take] = tokens[position : position + take]
            self.fill += take
            position += take
            if self.fill == self.buffer.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = f"{self.prefix}_{self.split}_{len(self.files):06d}.bin"
            write_shard(self.folder / name, self.buffer[: self.fill])
            self.files.append(name)
            self.fill = 0

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "files": self.files}


class _LineStream:
    """tqdm redraws its bar in place with carriage returns; in a log file each redraw becomes one line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total_bytes: int, stream: IO[str] = sys.stderr) -> tqdm:
    """Encoding progress in input megabytes: a live bar on a terminal, a plain line every 10 s otherwise."""
    terminal = stream.isatty()
    return tqdm(
        total=total_bytes,
        desc="encoding",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=stream if terminal else _LineStream(stream),
        mininterval=0.25 if terminal else 10.0,
        dynamic_ncols=terminal,
        ascii=not terminal,
    )


# ---------------------------------------------------------------------------------------------------------
# The command


def obtain_tokenizer(
    args: argparse.Namespace, files: Sequence[Path], split: ValSplit, output: Path
) -> tuple[Tokenizer, Path, SampleStats | None]:
    """Save --tokenizer into `output`, or train one there on a sample; return it, its file there, and the
    sample's size (None when given one)."""
    if args.tokenizer is not None:
        tokenizer = _load(args.tokenizer)
        check_tokenizer(tokenizer, args.vocab_size)
        path = output / (TOKENIZER_STEM + tokenizer.suffix)
        tokenizer.save(path)
        return tokenizer, path, None
    sample = SampleStats()
    kind = "SentencePiece BPE" if args.train == "sentencepiece" else "byte-level BPE"
    _log(f"training a {args.vocab_size}-token {kind} tokenizer on a sample of the training documents")
    docs = tokenizer_sample(
        iter_documents(files, ReadReport()), split, args.sample_docs, args.sample_bytes, sample
    )
    first = next(docs, None)
    if first is None:
        raise _no_documents_error(files, split, sample.documents_seen)
    docs = itertools.chain([first], docs)
    try:
        if args.train == "sentencepiece":
            from speedrun.data.tokenizer_sentencepiece import train_sentencepiece

            path = train_sentencepiece(docs, output / TOKENIZER_STEM, args.vocab_size, threads=args.workers)
        else:
            from speedrun.data.tokenizer_huggingface import train_bytelevel

            path = train_bytelevel(docs, output / f"{TOKENIZER_STEM}.json", args.vocab_size)
    except ValueError as error:
        raise PrepareError(str(error)) from None
    tokenizer = _load(path)
    check_tokenizer(tokenizer, None)
    _log(
        f"tokenizer {path}: {tokenizer.vocab_size:,} tokens, trained on {sample.documents:,} documents "
        f"({sample.bytes / 1e6:.1f} MB)"
    )
    return tokenizer, path, sample


def write_shards(
    args: argparse.Namespace, files: Sequence[Path], split: ValSplit, tokenizer_file: Path, folder: Path
) -> tuple[dict[str, ShardWriter], ReadReport]:
    """Encode every document into shards in `folder`; return the per-split writers and the read report."""
    report = ReadReport()
    writers = {name: ShardWriter(folder, args.prefix, name, args.shard_tokens) for name in SPLITS}
    chunks = document_chunks(iter_documents(files, report), split)
    with progress_bar(sum(path.stat().st_size for path in files)) as bar:
        for name, documents, tokens in encode_chunks(chunks, tokenizer_file, args.workers):
            writers[name].add(tokens, documents)
            bar.update(report.bytes_read - bar.n)
            bar.set_postfix_str(
                f"{sum(w.documents for w in writers.values()):,} docs, "
                f"{sum(w.tokens for w in writers.values()):,} tokens",
                refresh=False,
            )
        for writer in writers.values():
            writer.flush()
        bar.update(report.bytes_read - bar.n)
    return writers, report


def prepare(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Run the whole preparation; return the manifest it wrote."""
    files, ignored = discover_inputs(args.input)
    output: Path = args.output
    _claim_output(output, args.overwrite)
    staging = output / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # a previous run's leftovers, never accepted shards
    staging.mkdir(parents=True)
    if args.val_docs is not None:
        split = ValSplit(first_docs=args.val_docs)
    else:
        split = ValSplit(fraction=args.val_fraction)
    try:
        tokenizer, tokenizer_file, sample = obtain_tokenizer(args, files, split, output)
        writers, report = write_shards(args, files, split, tokenizer_file, staging)
        for line in report.lines():
            _log(line)
        if writers["train"].documents == 0 or writers["val"].documents == 0:
            documents = sum(w.documents for w in writers.values())
            raise _no_documents_error(files, split, documents, report)
        # Every shard is complete: only now do they become visible, then the manifest seals the folder.
        for writer in writers.values():
            for name in writer.files:
                os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    manifest = {
        "command": shlex.join(["python", "-m", "speedrun.prepare", *argv]),
        "inputs": [str(path) for path in args.input],
        "input_files": len(files),
        "ignored_files": {"count": len(ignored), "examples": [str(p) for p in ignored[:EXAMPLES_KEPT]]},
        "tokenizer": {
            "file": tokenizer_file.name,
            "kind": tokenizer.kind,
            # What `speedrun.train` compares data.tokenizer with (Tokenizer.fingerprint).
            "sha256": tokenizer.fingerprint(),
            "source": f"trained ({args.train})" if args.tokenizer is None else str(args.tokenizer),
            "sample_documents": None if sample is None else sample.documents,
            "sample_bytes": None if sample is None else sample.bytes,
        },
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.document_start_id,
        "shard_tokens": args.shard_tokens,
        "validation": split.describe(),
        "splits": {name: writer.summary() for name, writer in writers.items()},
        "skipped": dict(sorted(report.skipped.items())),
        "skipped_examples": report.skipped_examples,
        "repaired_documents": report.repaired,
        "repaired_examples": report.repaired_examples,
    }
    tmp = output / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output / MANIFEST_NAME)
    for name, writer in writers.items():
        _log(
            f"{name}: {writer.documents:,} documents, {writer.tokens:,} tokens in {len(writer.files)} shards"
        )
    if ignored:
        _log(
            f"ignored {len(ignored)} files in input folders that are not .txt/.jsonl/.jsonl.gz (e.g. {ignored[0]})"
        )
    _log(f"wrote {output / MANIFEST_NAME}")
    return manifest


def _claim_output(output: Path, overwrite: bool) -> None:
    """Refuse to mix two corpora in one folder; with --overwrite, clear the previous one first."""
    if output.exists() and not output.is_dir():
        raise PrepareError(f"--output {output} is a file, not a folder")
    old = [*list_shards(output, "train"), *list_shards(output, "val"), *output.glob(MANIFEST_NAME)]
    if not old:
        return
    if not overwrite:
        raise PrepareError(
            f"--output {output} already holds a prepared corpus ({len(old)} shard/manifest files); "
            "pass --overwrite to replace it or choose another folder"
        )
    for path in old:
        path.unlink()


def _no_documents_error(
    files: Sequence[Path], split: ValSplit, documents_seen: int, report: ReadReport | None = None
) -> PrepareError:
    where = f"{files[0]}" if len(files) == 1 else f"{len(files)} input files"
    if documents_seen == 0:
        problems = "; ".join(report.lines()) if report else "every line empty or unreadable"
        return PrepareError(f"no documents in {where} ({problems})")
    if split.first_docs is not None:
        return PrepareError(
            f"{where} holds {documents_seen} documents, not more than --val-docs {split.first_docs}: no training "
            "documents left; lower --val-docs"
        )
    return PrepareError(
        f"--val-fraction {split.fraction} put all {documents_seen} documents of {where} into one split; "
        "use --val-docs K for a small corpus"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _prefix(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-." for c in text):
        raise argparse.ArgumentTypeError(
            f"use letters, digits, '-' and '.' only (no '_' or '/'), got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m speedrun.prepare",
        description="Train or take a tokenizer and turn a text corpus into train/val token shards.",
    )
    parser.add_argument(
        "--input",
        type=Path,
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt files, .jsonl/.jsonl.gz files (documents in a 'text' field) or folders of them",
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the shards, tokenizer.model and manifest.json",
    )
    parser.add_argument(
        "--vocab-size",
        type=_positive_int,
        metavar="N",
        help="tokenizer vocabulary to train, at most 65536 (required unless --tokenizer is given)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--tokenizer",
        metavar="gpt2|PATH",
        help=f"use this tokenizer instead of training one (saved into --output): {GPT2_NAME}, a SentencePiece "
        ".model, a tiktoken .tiktoken rank file or a Hugging Face tokenizer .json",
    )
    source.add_argument(
        "--train",
        choices=TRAINERS,
        default="sentencepiece",
        help="the tokenizer to train: sentencepiece (BPE with byte fallback, as parameter-golf; default) or "
        "bytelevel (a GPT-2-style byte-level BPE, saved as a Hugging Face tokenizer.json)",
    )
    val = parser.add_mutually_exclusive_group()
    val.add_argument(
        "--val-docs",
        type=_positive_int,
        metavar="K",
        help="the first K documents are validation (parameter-golf: the first 50,000)",
    )
    val.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.01,
        metavar="F",
        help="this share of documents, chosen by a hash of their text, is validation (default 0.01)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=_positive_int,
        default=100_000_000,
        metavar="N",
        help="tokens per shard (default 100_000_000, as parameter-golf)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        # One core stays with the parent, which reads, parses and writes; 1 means no worker processes.
        default=max(1, min(8, (os.cpu_count() or 1) - 1)),
        metavar="W",
        help="tokenizing processes (default: CPU count - 1, at most 8)",
    )
    parser.add_argument(
        "--sample-docs",
        type=_positive_int,
        metavar="N",
        help="train the tokenizer on at most N documents (default: no limit but --sample-bytes)",
    )
    parser.add_argument(
        "--sample-bytes",
        type=_positive_int,
        default=10_000_000,
        metavar="N",
        help="train the tokenizer on about N bytes of text (default 10_000_000)",
    )
    parser.add_argument(
        "--prefix",
        type=_prefix,
        default="corpus",
        help="shard file prefix: <prefix>_train_000000.bin (default 'corpus')",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the shards and manifest already in --output"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vocab_size is None and args.tokenizer is None:
        parser.error("give --vocab-size N to train a tokenizer, or --tokenizer gpt2|PATH to use one")
    if args.vocab_size is not None and args.vocab_size > MAX_TOKEN_ID + 1:
        parser.error(
            f"--vocab-size {args.vocab_size} does not fit uint16 shards (at most {MAX_TOKEN_ID + 1})"
        )
    try:
        with sigterm_raises(Terminated):
            prepare(args, argv)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unreadable input, unwritable output, a full disk
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}; no shards were written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no shards were written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); no shards were written", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
