"""Data sources as Hydra builds them: the stdlib corpus, any shard folder, FineWeb; and their errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from speedrun.data import DataError, FinewebSP1024, ShardDataset, StdlibCorpus
from speedrun.data.shards import load_shard, write_shard


def test_stdlib_corpus_from_config(stdlib_corpus_dir: Path) -> None:
    data = instantiate({"_target_": "speedrun.data.StdlibCorpus", "seq_len": 128, "val_tokens": 5000})
    assert isinstance(data, StdlibCorpus) and data.cache_dir == stdlib_corpus_dir
    data.prepare()
    assert data.vocab_size() == 1024
    assert "stdlib" in data.describe() and "train shards" in data.describe()
    val = data.load_val_tokens()
    assert val.dtype == torch.uint16 and val.numel() == (4999 // 128) * 128 + 1
    np.testing.assert_array_equal(val.numpy(), load_shard(data.val_files()[0])[: val.numel()])
    x, y = data.train_loader(rank=0, world_size=1, device=torch.device("cpu")).next_batch(256)
    assert x.shape == (2, 128) and torch.equal(x[0, 1:], y[0, :-1])
    base_bytes, _, _ = data.byte_luts(torch.device("cpu"))
    assert base_bytes.shape == (1024,)


def test_whole_val_split_is_trimmed_to_whole_sequences(stdlib_corpus_dir: Path) -> None:
    data = StdlibCorpus(seq_len=1000)
    total = sum(load_shard(f).size for f in data.val_files())
    assert data.load_val_tokens().numel() == ((total - 1) // 1000) * 1000 + 1


@pytest.fixture
def folder(tmp_path: Path, stdlib_corpus_dir: Path) -> Path:
    """A prepared folder: two val shards (so the val limit crosses a boundary) and a real tokenizer."""
    out = tmp_path / "my_data"
    out.mkdir()
    shutil.copy(stdlib_corpus_dir / "stdlib_1024_bpe.model", out / "tok.model")
    write_shard(out / "my_train_000000.bin", np.arange(5000) % 1024)
    write_shard(out / "my_val_000000.bin", np.arange(300) % 1024)
    write_shard(out / "my_val_000001.bin", np.arange(300, 700) % 1024)
    return out


def test_shard_dataset_reads_a_prepared_folder(folder: Path) -> None:
    data = ShardDataset(path=str(folder), tokenizer=str(folder / "tok.model"), seq_len=64, val_tokens=500)
    data.prepare()
    assert data.vocab_size() == 1024
    assert [f.name for f in data.val_files()] == ["my_val_000000.bin", "my_val_000001.bin"]
    assert data.load_val_tokens().tolist() == list(range((499 // 64) * 64 + 1))  # 449 tokens, both shards
    assert "5,000 tokens" in data.describe()


def test_relative_paths_mean_the_launch_directory(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEEDRUN_ORIG_CWD", str(folder.parent))
    monkeypatch.chdir("/")  # as if Hydra had moved into its run folder
    data = ShardDataset(path="my_data", tokenizer="my_data/tok.model", seq_len=64)
    assert data.path == folder
    data.prepare()


def test_shard_dataset_errors_name_the_path_and_the_fix(folder: Path) -> None:
    with pytest.raises(DataError, match=f"{folder}_missing is not a folder.*speedrun.prepare"):
        ShardDataset(path=f"{folder}_missing", tokenizer=str(folder / "tok.model")).prepare()
    with pytest.raises(DataError, match=f"{folder / 'nope.model'} not found.*speedrun.prepare"):
        ShardDataset(path=str(folder), tokenizer=str(folder / "nope.model")).prepare()
    with pytest.raises(DataError, match="no train shards matching 'x_train_\\*.bin'"):
        ShardDataset(
            path=str(folder), tokenizer=str(folder / "tok.model"), train_pattern="x_train_*.bin"
        ).prepare()
    (folder / "bad.model").write_text("not a model")
    with pytest.raises(
        DataError,
        match="data.tokenizer: tokenizer .*bad.model is not a SentencePiece .model file.*speedrun.prepare",
    ):
        ShardDataset(path=str(folder), tokenizer=str(folder / "bad.model")).prepare()
    corrupt = folder / "my_val_000001.bin"
    corrupt.write_bytes(corrupt.read_bytes()[:-2])
    with pytest.raises(DataError, match=str(corrupt)):
        ShardDataset(path=str(folder), tokenizer=str(folder / "tok.model")).prepare()


def test_too_little_validation_data_is_refused(folder: Path) -> None:
    data = ShardDataset(path=str(folder), tokenizer=str(folder / "tok.model"), seq_len=128, val_tokens=100)
    with pytest.raises(DataError, match="fewer than one sequence of data.seq_len=128"):
        data.load_val_tokens()
    with pytest.raises(DataError, match="data.seq_len=0"):
        StdlibCorpus(seq_len=0)


def test_missing_fineweb_says_how_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEEDRUN_ORIG_CWD", str(tmp_path))
    data = instantiate({"_target_": "speedrun.data.FinewebSP1024", "seq_len": 1024})
    assert isinstance(data, FinewebSP1024) and data.path == tmp_path / "data/datasets/fineweb10B_sp1024"
    with pytest.raises(
        DataError, match="fineweb10B_sp1024.*python -m speedrun.data.fineweb --variant sp1024"
    ):
        data.prepare()
