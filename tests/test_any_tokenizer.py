"""A corpus prepared with each tokenizer kind trains through the real CLI, and its val_bpb agrees with an
independent count: the UTF-8 bytes of the decoded validation text the run scored."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speedrun.data import ShardDataset
from speedrun.data.stdlib_corpus import stdlib_documents
from speedrun.data.tokenizer_huggingface import train_bytelevel
from speedrun.data.tokenizer_kinds import load_tokenizer
from tests.conftest import REPO, TINY, cli_env, read_summary, run_train
from tests.tokenizer_builders import metaspace_json, rank_file_from_bytelevel

pytestmark = pytest.mark.timeout(240)
VAL_TOKENS = 8192  # TINY's data.val_tokens
SEQ_LEN = 64  # TINY's data.seq_len


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 1 MB of the stdlib's source (some of it non-ASCII) as JSON lines, a document per file."""
    folder = tmp_path_factory.mktemp("any_tokenizer")
    docs = [text for _, text in stdlib_documents(1_200_000)]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def given_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer files of the kinds that prepare is given rather than trains."""
    folder = tmp_path_factory.mktemp("given")
    sample = [text for _, text in stdlib_documents(600_000)]
    bytelevel = train_bytelevel(sample, folder / "bytelevel.json", 400)
    return {
        "tiktoken": rank_file_from_bytelevel(bytelevel, folder / "ranks.tiktoken"),
        "metaspace": metaspace_json(sample, folder / "metaspace.json"),
    }


def independent_bytes(tokens: np.ndarray, tokenizer) -> int:
    """UTF-8 bytes of the text the targets tokens[1:] stand for: each document's stretch decoded on its
    own (a stretch cut at the window's edge may end mid-character: U+FFFD, off by a byte or two)."""
    targets = tokens[1:].astype(np.int64)
    starts = np.flatnonzero(targets == tokenizer.document_start_id)
    pieces = np.split(targets, starts)
    return sum(
        len(tokenizer.decode(piece[piece != tokenizer.document_start_id].tolist()).encode())
        for piece in pieces
    )


@pytest.mark.parametrize(
    ("kind", "prepare_args", "tokenizer_file"),
    [
        ("sentencepiece", ["--vocab-size", "512"], "tokenizer.model"),
        ("bytelevel", ["--train", "bytelevel", "--vocab-size", "512"], "tokenizer.json"),
        ("tiktoken", ["--tokenizer", "tiktoken"], "tokenizer.tiktoken"),
        ("metaspace", ["--tokenizer", "metaspace"], "tokenizer.json"),
    ],
)
def test_a_corpus_prepared_with_each_kind_trains_and_its_bpb_counts_the_decoded_bytes(
    tmp_path, corpus, given_tokenizers, kind, prepare_args, tokenizer_file
):
    prepare_args = [str(given_tokenizers.get(arg, arg)) for arg in prepare_args]
    out = tmp_path / "prepared"
    prep = subprocess.run(
        [sys.executable, "-m", "speedrun.prepare", "--input", str(corpus), "--output", str(out),
         "--val-docs", "40", "--workers", "1", *prepare_args],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    tokenizer = load_tokenizer(out / tokenizer_file)
    assert (
        manifest["tokenizer"]["file"] == tokenizer_file
        and manifest["tokenizer"]["sha256"] == tokenizer.fingerprint()
    )
    assert (
        manifest["vocab_size"] == tokenizer.vocab_size and manifest["bos_id"] == tokenizer.document_start_id
    )

    run_dir = tmp_path / "run"
    run_train(
        run_dir, "data=shards", f"data.path={out}", f"data.tokenizer={out / tokenizer_file}",
        f"model.vocab_size={tokenizer.vocab_size}", "trainer.max_steps=3", "trainer.export=false",
    )  # fmt: skip
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["val_bpb"] is not None

    # The tokens the run scored, read the way it reads them; then an independent byte count.
    tokens = ShardDataset(str(out), seq_len=SEQ_LEN, val_tokens=VAL_TOKENS).load_val_tokens().numpy()
    scored = len(tokens) - 1
    expected_bpb = summary["val_loss"] / math.log(2) * scored / independent_bytes(tokens, tokenizer)
    assert summary["val_bpb"] == pytest.approx(expected_bpb, rel=0.005)


def test_tiny_overrides_are_the_ones_this_module_assumes():
    assert f"data.val_tokens={VAL_TOKENS}" in TINY and f"data.seq_len={SEQ_LEN}" in TINY
