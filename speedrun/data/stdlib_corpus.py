"""The default dataset every machine already has: the Python standard library's own source.

`build_stdlib_corpus` turns the stdlib's `.py` files (one document per file) into a
SentencePiece BPE tokenizer and train/val shards in the parameter-golf format, in seconds and
with no download. It builds once per cache folder: `manifest.json`, written last, marks a
complete build, and the whole folder appears by one atomic rename, so concurrent builders
(several ranks, several sweep jobs) never see half a build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from speedrun.data import DataError
from speedrun.data.paths import cache_root
from speedrun.data.shards import write_shard
from speedrun.data.tokenizer import encode_documents
from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer, train_sentencepiece

log = logging.getLogger(__name__)

BUILD_VERSION = 3
MANIFEST = "manifest.json"
MAX_CORPUS_BYTES = 24_000_000  # caps tokenizer training + encoding time on newer, larger stdlibs
VAL_PER_MILLE = 20  # ~2% of documents, chosen by a hash of their path
SHARD_TOKENS = 1 << 20  # small shards, so even the default run streams across shard boundaries
# Not library source: tests, the IDE, the retired 2to3, build-machine data, bundled wheels, doc dumps.
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "lib-dynload"}
EXCLUDED_DIRS |= {"ensurepip", "pydoc_data"}
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)  # differs between builds of the same Python version


def default_cache_dir(vocab_size: int = 1024) -> Path:
    """`<speedrun cache>/stdlib_v<BUILD_VERSION>_<vocab>` (the cache: `speedrun.data.paths.cache_root`)."""
    return cache_root() / f"stdlib_v{BUILD_VERSION}_{vocab_size}"


def _build_key(vocab_size: int) -> dict[str, object]:
    return {
        "build_version": BUILD_VERSION,
        "python": platform.python_version(),  # the stdlib's text changes between releases
        "vocab_size": vocab_size,
    }


def read_manifest(cache_dir: Path, vocab_size: int) -> dict | None:
    """The manifest of a complete build for this key, or None (absent, unreadable, other key)."""
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    key = _build_key(vocab_size)
    return manifest if all(manifest.get(k) == v for k, v in key.items()) else None


def stdlib_documents(max_bytes: int = MAX_CORPUS_BYTES) -> list[tuple[str, str]]:
    """(relative path, text) for the stdlib's source files, sorted, up to max_bytes of UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    docs: list[tuple[str, str]] = []
    total = 0
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if path.name.startswith(EXCLUDED_FILE_PREFIXES):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few distributions ship a stray non-UTF-8 file; it is not worth a special case
        # '▁' is SentencePiece's escaped space: a literal one would decode as a space and skew byte counts.
        if not text or "\u2581" in text:
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        docs.append((rel, text))
        total += size
    return docs


def is_val_document(rel_path: str) -> bool:
    """A stable split: the same file lands in the same split on every machine."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < VAL_PER_MILLE


def _encode_to_shards(tokenizer: SentencePieceTokenizer, texts: list[str], folder: Path, split: str) -> int:
    # BOS opens every document: the model sees where files start, and bpb does not count a space there.
    tokens = encode_documents(tokenizer, texts)
    for index, start in enumerate(range(0, max(len(tokens), 1), SHARD_TOKENS)):
        write_shard(folder / f"stdlib_{split}_{index:06d}.bin", tokens[start : start + SHARD_TOKENS])
    return len(tokens)


def _build_into(folder: Path, vocab_size: int) -> dict:
    t0 = time.perf_counter()
    docs = stdlib_documents()
    train = [text for rel, text in docs if not is_val_document(rel)]
    # Sorted paths put whole packages (or the Unicode tables) back to back, and the loader reads the
    # stream in order: a fixed shuffle makes every stretch of training look like the whole corpus.
    random.Random(BUILD_VERSION).shuffle(train)
    val = [text for rel, text in docs if is_val_document(rel)]
    train_bytes = sum(len(t.encode("utf-8")) for t in train)
    log.info(
        "stdlib corpus: %d documents (%d train, %.1f MB; %d val) read in %.1fs",
        len(docs),
        len(train),
        train_bytes / 1e6,
        len(val),
        time.perf_counter() - t0,
    )
    t1 = time.perf_counter()
    # The whole (capped) train split is the tokenizer's sample: 20k chunks of 4 KB hold it all.
    model_path = train_sentencepiece(
        train, folder / f"stdlib_{vocab_size}_bpe", vocab_size, max_sentences=20_000
    )
    (folder / f"stdlib_{vocab_size}_bpe.vocab").unlink(missing_ok=True)
    log.info("stdlib corpus: trained a %d-token BPE tokenizer in %.1fs", vocab_size, time.perf_counter() - t1)
    t2 = time.perf_counter()
    tokenizer = SentencePieceTokenizer(model_path)
    train_tokens = _encode_to_shards(tokenizer, train, folder, "train")
    val_tokens = _encode_to_shards(tokenizer, val, folder, "val")
    log.info(
        "stdlib corpus: encoded %d train and %d val tokens in %.1fs",
        train_tokens,
        val_tokens,
        time.perf_counter() - t2,
    )
    return {
        **_build_key(vocab_size),
        "documents": {"train": len(train), "val": len(val)},
        "tokens": {"train": train_tokens, "val": val_tokens},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }


def _looks_like_a_build(folder: Path) -> bool:
    """Only folders holding nothing but our own files may be replaced (never a user's folder)."""
    return folder.is_dir() and all(
        p.name == MANIFEST or p.name.startswith("stdlib_") for p in folder.iterdir()
    )


def build_stdlib_corpus(cache_dir: str | os.PathLike | None = None, vocab_size: int = 1024) -> Path:
    """Build (or reuse) the stdlib corpus in cache_dir; return that folder."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(vocab_size)
    if read_manifest(cache_dir, vocab_size) is not None:
        return cache_dir
    if cache_dir.exists() and not _looks_like_a_build(cache_dir):
        raise DataError(
            f"stdlib corpus cache_dir {cache_dir} exists and holds other files; point cache_dir at a new folder"
        )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _one_builder(cache_dir):
        # Another process may have built it while this one waited.
        if read_manifest(cache_dir, vocab_size) is None:
            _build(cache_dir, vocab_size)
    return cache_dir


@contextlib.contextmanager
def _one_builder(cache_dir: Path):
    """One process builds at a time (a blocking flock beside the folder); the others wait for its build
    instead of repeating it. The atomic rename below still protects readers that do not wait."""
    fd = os.open(cache_dir.parent / f".{cache_dir.name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(cache_dir: Path, vocab_size: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.build-", dir=cache_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary shared data
    try:
        log.info("stdlib corpus: building %s (once; later runs reuse it)", cache_dir)
        manifest = _build_into(tmp, vocab_size)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the build complete
        if cache_dir.exists() and read_manifest(cache_dir, vocab_size) is None:
            # A stale build (older version, other Python): set it aside, then replace it.
            stale = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.stale-", dir=cache_dir.parent))
            try:
                os.replace(cache_dir, stale / "old")
            except OSError:
                pass  # someone else moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if read_manifest(cache_dir, vocab_size) is None:
                raise
            log.info("stdlib corpus: another process finished first; using its build")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "stdlib corpus: ready in %s (%s tokens)", cache_dir, read_manifest(cache_dir, vocab_size)["tokens"]
    )
