"""Wrong data is refused before training, in one line naming the file: a tokenizer other than the one
the shards were prepared with, token ids the vocabulary cannot hold, an unusable cache folder. Shards
without a tokenizer train with val_loss only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from speedrun.data import DataError, ShardDataset
from speedrun.data.checks import MAX_IDS_CACHE, max_token_ids
from speedrun.data.paths import cache_root
from speedrun.data.shards import load_shard, write_shard
from speedrun.data.stdlib_corpus import stdlib_documents
from speedrun.data.tokenizer import file_sha256
from speedrun.data.tokenizer_sentencepiece import train_sentencepiece
from tests.conftest import cli_env, read_metrics, read_summary, run_train

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, stdlib_corpus_dir: Path) -> Path:
    """A folder as `speedrun.prepare` leaves it: shards, tokenizer.model, a manifest recording its sha256."""
    folder = tmp_path_factory.mktemp("prepared")
    tokens = np.asarray(load_shard(sorted(stdlib_corpus_dir.glob("stdlib_train_*.bin"))[0])[:40_000])
    write_shard(folder / "mine_train_000000.bin", tokens[:30_000])
    write_shard(folder / "mine_val_000000.bin", tokens[30_000:])
    shutil.copy(stdlib_corpus_dir / "stdlib_1024_bpe.model", folder / "tokenizer.model")
    manifest = {"tokenizer": {"file": "tokenizer.model", "sha256": file_sha256(folder / "tokenizer.model")}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """Another real 1024-piece SentencePiece model: same vocabulary size, different pieces."""
    texts = [text for _, text in stdlib_documents(800_000)][::-1]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("other") / "other", 1024, threads=1)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "data"))


def error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]


def assert_refused(proc, run_dir: Path, *expected: str) -> str:
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert all(text in errors[0] for text in expected), errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir / "checkpoints").exists()
    return errors[0]


def test_a_tokenizer_other_than_the_manifests_is_refused_unless_allowed(prepared, other_tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "data=shards", f"data.path={prepared}", f"data.tokenizer={other_tokenizer}",
                     "trainer.max_steps=2", check=False)  # fmt: skip
    line = assert_refused(
        proc, run_dir, str(other_tokenizer), "is not the tokenizer the shards in", str(prepared),
        "tokenizer.model", "data.allow_tokenizer_mismatch=true",
    )  # fmt: skip
    assert (
        file_sha256(other_tokenizer)[:12] in line and file_sha256(prepared / "tokenizer.model")[:12] in line
    )

    allowed = tmp_path / "allowed"
    run_train(allowed, "data=shards", f"data.path={prepared}", f"data.tokenizer={other_tokenizer}",
              "data.allow_tokenizer_mismatch=true", "trainer.max_steps=2", "trainer.export=false")  # fmt: skip
    assert read_summary(allowed)["status"] == "completed"
    assert "accepted because data.allow_tokenizer_mismatch=true" in (allowed / "train.log").read_text()


def test_the_manifests_tokenizer_is_accepted(prepared):
    data = ShardDataset(str(prepared), str(prepared / "tokenizer.model"), seq_len=64)
    data.prepare(model_vocab_size=1024)
    assert data.vocab_size() == 1024


def test_a_token_id_beyond_the_vocabulary_is_refused_naming_the_shard(prepared, tmp_path):
    folder = copy_of(prepared, tmp_path)
    bad = folder / "mine_train_000001.bin"
    write_shard(bad, np.array([5, 1500, 7], dtype=np.uint16))
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "data=shards", f"data.path={folder}", f"data.tokenizer={folder / 'tokenizer.model'}",
                     "trainer.max_steps=2", check=False)  # fmt: skip
    assert_refused(proc, run_dir, str(bad), "token id 1500 >= the tokenizer's vocab 1024")
    assert "status" in read_summary(run_dir) and str(bad) in read_summary(run_dir)["error"]


def test_without_a_tokenizer_val_loss_is_measured_and_val_bpb_is_null(prepared, tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "data=shards", f"data.path={prepared}", "trainer.max_steps=4", "trainer.val_every=2")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["val_bpb"] is None and summary["quant_val_bpb"] is None
    assert summary["val_loss"] > 0 and summary["quant_val_loss"] > 0
    evals = [r for r in read_metrics(run_dir) if "val/loss" in r]
    assert len(evals) == 3 and all(r["val/bpb"] is None and r["val/loss"] > 0 for r in evals)
    log = (run_dir / "train.log").read_text()
    assert log.count("no data.tokenizer: val_bpb will be null and only val_loss is measured") == 1
    assert f"these shards were prepared with {prepared / 'tokenizer.model'}" in log


def test_without_a_tokenizer_ids_must_fit_the_model(prepared, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "data=shards", f"data.path={prepared}", "model.vocab_size=256",
                     "trainer.max_steps=2", check=False)  # fmt: skip
    line = assert_refused(proc, run_dir, ">= model.vocab_size=256", "raise model.vocab_size")
    assert str(prepared / "mine_train_000000.bin") in line


def test_model_vocab_may_pad_the_tokenizers_but_not_fall_short(prepared):
    data = ShardDataset(str(prepared), str(prepared / "tokenizer.model"), seq_len=64)
    data.prepare(model_vocab_size=1088)  # modded-nanogpt pads GPT-2's 50,257 ids to 50,304 likewise
    with pytest.raises(
        DataError,
        match=r"model.vocab_size=1000 is smaller than the tokenizer's vocab 1024 .*set model.vocab_size=1024",
    ):
        data.prepare(model_vocab_size=1000)


def test_the_largest_id_of_each_shard_is_cached_until_the_shard_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path / "cache"))
    shard = tmp_path / "x_train_000000.bin"
    write_shard(shard, np.array([3, 9, 4], dtype=np.uint16))
    empty = tmp_path / "x_val_000000.bin"
    write_shard(empty, np.zeros(0, dtype=np.uint16))
    assert max_token_ids([shard, empty]) == [9, -1]
    cache_file = cache_root() / MAX_IDS_CACHE
    cache = json.loads(cache_file.read_text())
    assert cache[str(shard.resolve())][2] == 9
    # The cache is what is read while the shard is unchanged (size and mtime as recorded) ...
    cache[str(shard.resolve())][2] = 77
    cache_file.write_text(json.dumps(cache))
    assert max_token_ids([shard]) == [77]
    # ... and a rewritten shard is read again.
    write_shard(shard, np.array([3, 12, 4, 1], dtype=np.uint16))
    assert max_token_ids([shard]) == [12]


def test_an_unusable_speedrun_cache_is_named_in_one_line(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    run_dir = tmp_path / "run"
    proc = run_train(
        run_dir, "trainer.max_steps=2", check=False, env=cli_env(SPEEDRUN_CACHE=str(not_a_folder))
    )
    assert_refused(
        proc, run_dir, f"SPEEDRUN_CACHE={not_a_folder}", "point SPEEDRUN_CACHE at a writable folder"
    )


def test_the_cache_follows_speedrun_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("SPEEDRUN_CACHE")
    assert cache_root() == tmp_path / "xdg" / "speedrun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "speedrun"
    # A relative SPEEDRUN_CACHE means the folder the user launched from, as every other path.
    monkeypatch.setenv("SPEEDRUN_ORIG_CWD", str(tmp_path))
    monkeypatch.setenv("SPEEDRUN_CACHE", "rel")
    assert cache_root() == tmp_path / "rel" and os.path.isdir(tmp_path / "rel")
