"""The embedded corpus: lossless, split by document, built once, safe to build concurrently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from speedrun.data import DataError
from speedrun.data.shards import list_shards, load_shard, read_shard_header
from speedrun.data.stdlib_corpus import (
    BUILD_VERSION,
    MANIFEST,
    build_stdlib_corpus,
    default_cache_dir,
    is_val_document,
    read_manifest,
    stdlib_documents,
)

BOS = 1


def test_default_cache_follows_speedrun_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPEEDRUN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the user's cache folder, never the source tree
    assert (
        default_cache_dir(512) == tmp_path / "home" / ".cache" / "speedrun" / f"stdlib_v{BUILD_VERSION}_512"
    )
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / f"stdlib_v{BUILD_VERSION}_1024"


def test_manifest_records_a_complete_build(stdlib_corpus_dir: Path) -> None:
    manifest = read_manifest(stdlib_corpus_dir, 1024)
    assert manifest is not None and manifest["vocab_size"] == 1024
    train, val = list_shards(stdlib_corpus_dir, "train"), list_shards(stdlib_corpus_dir, "val")
    assert manifest["tokens"]["train"] == sum(map(read_shard_header, train)) > 2_000_000
    assert manifest["tokens"]["val"] == sum(map(read_shard_header, val)) > 20_000
    assert read_manifest(stdlib_corpus_dir, 512) is None  # another vocabulary is another build


def test_tokenizer_matches_parameter_golf_conventions(stdlib_corpus_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(stdlib_corpus_dir / "stdlib_1024_bpe.model"))
    assert sp.vocab_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(1024)) == 256
    # The byte tables count a piece's text after one leading '▁': any other '▁' would be miscounted.
    assert not [p for p in map(sp.id_to_piece, range(1024)) if "▁" in p[1:]]
    assert sp.encode("12345", out_type=str) == ["1", "2", "3", "4", "5"]


def test_split_is_by_document_and_stable() -> None:
    docs = stdlib_documents()
    val = [rel for rel, _ in docs if is_val_document(rel)]
    assert 0.005 < len(val) / len(docs) < 0.05
    assert is_val_document(val[0]) and val == [rel for rel, _ in docs if is_val_document(rel)]
    assert not [rel for rel, _ in docs if "/test/" in f"/{rel}" or "site-packages" in rel]
    assert [rel for rel, _ in docs] == sorted(rel for rel, _ in docs)


def test_val_shards_decode_to_the_val_files_exactly(stdlib_corpus_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(stdlib_corpus_dir / "stdlib_1024_bpe.model"))
    tokens = np.concatenate([load_shard(f) for f in list_shards(stdlib_corpus_dir, "val")]).astype(np.int64)
    assert tokens[0] == BOS
    decoded = [sp.decode(doc.tolist()) for doc in np.split(tokens, np.flatnonzero(tokens == BOS))[1:]]
    originals = [text for rel, text in stdlib_documents() if is_val_document(rel)]
    assert decoded == originals


def test_a_second_build_reuses_the_first(stdlib_corpus_dir: Path) -> None:
    stamp = (stdlib_corpus_dir / MANIFEST).stat().st_mtime_ns
    assert build_stdlib_corpus(stdlib_corpus_dir, 1024) == stdlib_corpus_dir
    assert (stdlib_corpus_dir / MANIFEST).stat().st_mtime_ns == stamp


BUILD = "import sys; from speedrun.data.stdlib_corpus import build_stdlib_corpus as b; b(sys.argv[1], 512)"


def test_concurrent_builders_both_succeed_and_agree(tmp_path: Path) -> None:
    target = tmp_path / "corpus"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    builders = [subprocess.Popen([sys.executable, "-c", BUILD, str(target)], env=env) for _ in range(2)]
    assert [b.wait(timeout=120) for b in builders] == [0, 0]
    assert read_manifest(target, 512)["vocab_size"] == 512
    # No temporary or stale folders left behind (the builders' lock file beside it stays, empty).
    assert sorted(tmp_path.iterdir()) == [tmp_path / f".{target.name}.lock", target]
    assert len(list_shards(target, "train")) >= 1


def test_a_stale_build_is_replaced_and_a_foreign_folder_refused(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / MANIFEST).write_text(json.dumps({"build_version": 0, "vocab_size": 512}))
    (stale / "stdlib_train_000000.bin").write_bytes(b"junk")
    build_stdlib_corpus(stale, 512)
    assert read_manifest(stale, 512) is not None
    assert read_shard_header(stale / "stdlib_train_000000.bin") > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stale.lock", "stale"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=f"{foreign}.*other files"):
        build_stdlib_corpus(foreign, 512)
    assert (foreign / "notes.txt").read_text() == "keep me"
