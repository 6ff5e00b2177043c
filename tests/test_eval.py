"""Validation loss and bits-per-byte, checked against independent counts on the real stdlib corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from speedrun.data.shards import load_shard
from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer
from speedrun.eval import count_target_bytes, evaluate

VOCAB = 1024
BOS = 1


@pytest.fixture(scope="module")
def sp(stdlib_corpus_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(stdlib_corpus_dir / "stdlib_1024_bpe.model"))


@pytest.fixture(scope="module")
def luts(stdlib_corpus_dir: Path):
    tokenizer = SentencePieceTokenizer(stdlib_corpus_dir / "stdlib_1024_bpe.model")
    return tokenizer.token_bytes().as_tensors(torch.device("cpu"))


@pytest.fixture(scope="module")
def val_tokens(stdlib_corpus_dir: Path) -> np.ndarray:
    return np.asarray(load_shard(stdlib_corpus_dir / "stdlib_val_000000.bin"), dtype=np.int64)


def lut_bytes(tokens: np.ndarray, luts) -> int:
    t = torch.from_numpy(tokens)
    return int(count_target_bytes(t[:-1], t[1:], luts).item())


def test_lut_bytes_equal_the_decoded_documents(sp, luts, val_tokens: np.ndarray) -> None:
    # Whole documents only: end on the BOS that opens the next one (a BOS target stands for 0 bytes).
    starts = np.flatnonzero(val_tokens == BOS)
    end = starts[starts <= 60_000][-1]
    tokens = val_tokens[: end + 1]
    assert tokens[0] == BOS and len(starts[starts <= end]) >= 3
    # Independent count: decode each document and measure its UTF-8. The reference drops the space a
    # document opens with (after a boundary token a leading '▁' is SentencePiece's dummy prefix), while
    # this tokenizer (add_dummy_prefix=False) decodes it; so such a document counts one byte less.
    expected = 0
    for doc in np.split(tokens[1:-1], np.flatnonzero(tokens[1:-1] == BOS)):
        text = sp.decode(doc[doc != BOS].tolist())
        expected += len(text.encode("utf-8")) - text.startswith(" ")
    assert lut_bytes(tokens, luts) == expected


def test_leading_space_after_a_boundary_and_byte_fallback(sp, luts) -> None:
    first, second = " naïve café 🙂 → 42\n", "x = 'λ'  # spaces  kept\n"
    ids = [BOS, *sp.encode(first), BOS, *sp.encode(second)]
    assert sp.decode(ids) == first + second
    assert any(sp.is_byte(i) for i in ids)  # the emoji is spelled in bytes
    assert lut_bytes(np.array(ids), luts) == len(first.encode()) - 1 + len(second.encode())
    # Without the boundary in front, the same leading space counts.
    assert lut_bytes(np.array([BOS, *sp.encode("x"), *sp.encode(first)]), luts) == 1 + len(first.encode())


def test_luts_mark_control_tokens_as_boundaries_and_byte_pieces_as_one_byte(luts) -> None:
    base, space, boundary = luts
    assert base.dtype == torch.int16 and space.dtype == boundary.dtype == torch.bool
    assert base.shape == space.shape == boundary.shape == (VOCAB,)
    assert boundary[[0, 1, 2, 3]].all() and not boundary[4:].any()
    assert (base[4:260] == 1).all()  # the 256 byte-fallback tokens
    assert base[[0, 1, 2, 3]].sum() == 0


class UniformLogits(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.numel(), self.vocab_size)
        return F.cross_entropy(logits, y.reshape(-1))


def test_uniform_logits_give_ln_vocab(luts, val_tokens: np.ndarray) -> None:
    tokens = torch.from_numpy(val_tokens[: 20 * 64 + 1])
    loss, bpb = evaluate(UniformLogits(VOCAB), tokens, luts, seq_len=64, batch_tokens=3 * 64, device="cpu")
    assert loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert bpb == pytest.approx(math.log2(VOCAB) * 20 * 64 / lut_bytes(tokens.numpy(), luts), rel=1e-6)


class Bigram(nn.Module):
    def __init__(self, vocab_size: int = VOCAB):
        super().__init__()
        torch.manual_seed(0)
        self.logits = nn.Embedding(vocab_size, vocab_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x).flatten(0, 1), y.reshape(-1))


def direct_loss(model: nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model.logits(tokens[:-1].long()).double()
        return F.cross_entropy(logits, tokens[1:].long()).item()


@pytest.mark.parametrize("batch_tokens", [32, 7 * 32, 10_000])
def test_loss_is_the_mean_over_all_targets_whatever_the_batch(luts, val_tokens, batch_tokens: int) -> None:
    tokens = torch.from_numpy(val_tokens[: 23 * 32 + 1].astype(np.uint16))  # uint16, as load_val_tokens gives
    model = Bigram()
    loss, bpb = evaluate(model, tokens, luts, seq_len=32, batch_tokens=batch_tokens, device="cpu")
    expected = direct_loss(model, tokens.long())
    assert loss == pytest.approx(expected, rel=1e-6)
    assert bpb == pytest.approx(expected / math.log(2) * 23 * 32 / lut_bytes(val_tokens[: 23 * 32 + 1], luts))


def test_model_mode_is_restored_and_bad_batch_refused(luts, val_tokens) -> None:
    tokens = torch.from_numpy(val_tokens[:129])
    model = Bigram()
    for training in (True, False):
        model.train(training)
        evaluate(model, tokens, luts, seq_len=32, batch_tokens=64, device="cpu")
        assert model.training is training
    with pytest.raises(ValueError, match="batch_tokens=16"):
        evaluate(model, tokens, luts, seq_len=32, batch_tokens=16, device="cpu")


def _rank_worker(rank: int, world_size: int, folder: Path, tokens: torch.Tensor, luts) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=world_size
    )
    try:
        result = evaluate(
            Bigram(),
            tokens,
            luts,
            seq_len=32,
            batch_tokens=64,
            rank=rank,
            world_size=world_size,
            device="cpu",
        )
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_with_one(luts, val_tokens, tmp_path: Path) -> None:
    tokens = torch.from_numpy(val_tokens[: 13 * 32 + 1])  # 13 sequences: an uneven split
    single = evaluate(Bigram(), tokens, luts, seq_len=32, batch_tokens=64, device="cpu")
    mp.spawn(_rank_worker, args=(2, tmp_path, tokens, luts), nprocs=2)
    results = [tuple(json.loads((tmp_path / f"rank{rank}.json").read_text())) for rank in range(2)]
    assert results[0] == results[1]
    assert results[0] == pytest.approx(single, rel=1e-9)
