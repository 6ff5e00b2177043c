"""Turn a text corpus into a SentencePiece tokenizer and token shards: `python -m speedrun.prepare`.

    python -m speedrun.prepare --input corpus.jsonl notes/ --output data/mine --vocab-size 1024

Inputs are `.txt` files (one document each), `.jsonl` / `.jsonl.gz` files (one document per line, in its
`text` field), or folders of those (read recursively, in sorted order). The corpus is streamed twice: once
for a bounded sample that trains the tokenizer (skipped with `--tokenizer`), once to encode every document,
BOS first, into `<prefix>_train_NNNNNN.bin` / `<prefix>_val_NNNNNN.bin` shards. Memory stays flat however
large the corpus: one preallocated shard buffer per split and a few chunks of text in flight.

Nothing is dropped silently: unreadable lines are skipped and counted by reason, undecodable bytes are
replaced with U+FFFD and the document counted as repaired, and both are reported on stderr and in
`manifest.json`, which is written last. Shards appear in the output folder only once every document has
been encoded, so an interrupted run leaves nothing a training run would accept.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import sentencepiece as spm

from speedrun.cli import Parser
from speedrun.data.shards import MAX_TOKEN_ID, TOKEN_DTYPE, list_shards, write_shard
from speedrun.data.tokenizer import encode_documents, load_sentencepiece, train_sentencepiece

SPLITS = ("val", "train")
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
STAGING_NAME = ".prepare-partial"  # shards wait here until the whole corpus is encoded
CHUNK_CHARS = 1 << 20  # documents are sent to workers ~1 MB at a time
EXAMPLES_KEPT = 5  # per skip reason, the first few places are reported
SKIP_REASONS = {
    "not_json": "lines that are not JSON",
    "no_text_field": "JSON lines without a 'text' field",
    "text_not_string": "JSON lines whose 'text' is not a string",
    "empty": "empty documents",
}


class PrepareError(Exception):
    """Bad input or usage: printed as one `error:` line, exit status 2."""


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
    """The first training documents, up to the sample limits (validation text never trains the tokenizer)."""
    for index, text in enumerate(docs):
        stats.documents_seen += 1
        if split.is_val(index, text):
            continue
        yield text
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        if stats.bytes >= max_bytes or (max_docs is not None and stats.documents >= max_docs):
            return


def install_tokenizer(source: Path, output: Path, vocab_size: int | None) -> None:
    """Copy a given SentencePiece model (and its .vocab, if any) into the output folder."""
    processor = _load(source)
    if vocab_size is not None and processor.get_piece_size() != vocab_size:
        raise PrepareError(
            f"--tokenizer {source} has vocab {processor.get_piece_size()} but --vocab-size is {vocab_size}; "
            "drop --vocab-size or make them agree"
        )
    model = output / TOKENIZER_NAME
    for src, dst in ((source, model), (source.with_suffix(".vocab"), model.with_suffix(".vocab"))):
        if src.is_file() and not (dst.exists() and dst.samefile(src)):
            shutil.copyfile(src, dst)


def _load(path: Path) -> spm.SentencePieceProcessor:
    try:
        processor = load_sentencepiece(path)
    except ValueError as error:
        raise PrepareError(str(error)) from None
    if processor.bos_id() < 0:
        raise PrepareError(
            f"tokenizer {path} has no BOS piece, which marks document starts; train it with bos_id=1"
        )
    if processor.get_piece_size() > MAX_TOKEN_ID + 1:
        raise PrepareError(
            f"tokenizer {path} has {processor.get_piece_size()} pieces; shards hold at most 65536"
        )
    return processor


# ---------------------------------------------------------------------------------------------------------
# Encoding


def document_chunks(docs: Iterator[str], split: ValSplit) -> Iterator[tuple[str, list[str]]]:
    """Group documents into ~CHUNK_CHARS chunks, one open chunk per split, so each split keeps its order."""
    chunks: dict[str, list[str]] = {name: [] for name in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for index, text in enumerate(docs):
        name = "val" if split.is_val(index, text) else "train"
        chunks[name].append(text)
        sizes[name] += len(text)
        if sizes[name] >= CHUNK_CHARS:
            yield name, chunks[name]
            chunks[name], sizes[name] = [], 0
    for name in SPLITS:
        if chunks[name]:
            yield name, chunks[name]


_worker_processor: spm.SentencePieceProcessor | None = None


def _init_worker(model_path: str) -> None:
    # Each worker loads the model once, not once per chunk.
    global _worker_processor
    _worker_processor = load_sentencepiece(model_path)


def _encode_chunk(texts: list[str]) -> np.ndarray:
    return encode_documents(_worker_processor, texts)


def encode_chunks(
    chunks: Iterator[tuple[str, list[str]]], model_path: Path, workers: int
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Encode chunks in order with `workers` processes; yield (split, documents, tokens) per chunk.

    Not Pool.imap: it reads its input as fast as it can, so a slow pool would let the whole corpus pile up
    in memory. Here at most 2 chunks per worker are in flight.
    """
    if workers == 1:
        processor = load_sentencepiece(model_path)
        for name, texts in chunks:
            yield name, len(texts), encode_documents(processor, texts)
        return
    # spawn, not fork: workers start clean whatever the parent holds (threads, the heap left by tokenizer
    # training), and behave the same on every platform.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        in_flight: deque = deque()
        for name, texts in chunks:
            in_flight.append((name, len(texts), pool.apply_async(_encode_chunk, (texts,))))
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


class Progress:
    """A status line on stderr: redrawn in place on a terminal, a plain log line every 10 s otherwise."""

    def __init__(self, total_bytes: int, stream: IO[str] = sys.stderr) -> None:
        self.total_mb = total_bytes / 1e6
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.25 if self.tty else 10.0
        self.start = self.last = time.monotonic()

    def update(self, bytes_read: int, documents: int, tokens: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        mb = bytes_read / 1e6
        line = (
            f"encoded {mb:,.1f}/{self.total_mb:,.1f} MB ({100 * mb / max(self.total_mb, 1e-9):.0f}%), "
            f"{documents:,} docs, {tokens:,} tokens, {mb / max(now - self.start, 1e-9):.1f} MB/s"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))  # ESC[K: erase the old tail
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------
# The command


def obtain_tokenizer(
    args: argparse.Namespace, files: Sequence[Path], split: ValSplit, model_path: Path
) -> SampleStats | None:
    """Install --tokenizer, or train one on a sample; return the sample's size (None when given one)."""
    if args.tokenizer is not None:
        install_tokenizer(args.tokenizer, model_path.parent, args.vocab_size)
        return None
    sample = SampleStats()
    _log(f"training a {args.vocab_size}-piece BPE tokenizer on a sample of the training documents")
    docs = tokenizer_sample(
        iter_documents(files, ReadReport()), split, args.sample_docs, args.sample_bytes, sample
    )
    try:
        train_sentencepiece(docs, model_path.with_suffix(""), args.vocab_size, threads=args.workers)
    except ValueError as error:
        if sample.documents == 0:
            raise _no_documents_error(files, split, sample.documents_seen) from None
        raise PrepareError(str(error)) from None
    _log(f"tokenizer {model_path}: trained on {sample.documents:,} documents ({sample.bytes / 1e6:.1f} MB)")
    return sample


def write_shards(
    args: argparse.Namespace, files: Sequence[Path], split: ValSplit, model_path: Path, folder: Path
) -> tuple[dict[str, ShardWriter], ReadReport]:
    """Encode every document into shards in `folder`; return the per-split writers and the read report."""
    report = ReadReport()
    writers = {name: ShardWriter(folder, args.prefix, name, args.shard_tokens) for name in SPLITS}
    progress = Progress(sum(path.stat().st_size for path in files))

    def show(final: bool = False) -> None:
        documents = sum(w.documents for w in writers.values())
        progress.update(report.bytes_read, documents, sum(w.tokens for w in writers.values()), final=final)

    chunks = document_chunks(iter_documents(files, report), split)
    for name, documents, tokens in encode_chunks(chunks, model_path, args.workers):
        writers[name].add(tokens, documents)
        show()
    for writer in writers.values():
        writer.flush()
    show(final=True)
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
    model_path = output / TOKENIZER_NAME
    try:
        sample = obtain_tokenizer(args, files, split, model_path)
        processor = _load(model_path)
        writers, report = write_shards(args, files, split, model_path, staging)
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
            "file": TOKENIZER_NAME,
            "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
            "source": "trained" if args.tokenizer is None else str(args.tokenizer),
            "sample_documents": None if sample is None else sample.documents,
            "sample_bytes": None if sample is None else sample.bytes,
        },
        "vocab_size": processor.get_piece_size(),
        "bos_id": processor.bos_id(),
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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
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
        description="Train a SentencePiece tokenizer on a text corpus and write train/val token shards.",
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
        help="tokenizer vocabulary to train (required unless --tokenizer is given)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        metavar="MODEL",
        help="use this SentencePiece .model instead of training one (copied into --output)",
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
        type=_fraction,
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
        parser.error("give --vocab-size N to train a tokenizer, or --tokenizer MODEL to use one")
    if args.vocab_size is not None and args.vocab_size > MAX_TOKEN_ID + 1:
        parser.error(f"--vocab-size {args.vocab_size} does not fit uint16 shards (at most 65536)")
    try:
        prepare(args, argv)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no shards were written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
