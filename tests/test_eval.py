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
from hydra.utils import instantiate
from torch import nn

from speedrun.checkpoint import CheckpointManager, load_checkpoint
from speedrun.data.shards import load_shard
from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer
from speedrun.eval import count_target_bytes, evaluate, sliding_windows
from speedrun.models import GPT, ModdedGPT
from speedrun.models.nanochat import NanochatGPT
from speedrun.models.protocol import IGNORE_INDEX
from tests.conftest import read_metrics, read_summary, run_train

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
    result = evaluate(UniformLogits(VOCAB), tokens, luts, seq_len=64, batch_tokens=3 * 64, device="cpu")
    assert result.loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result.bpb == pytest.approx(math.log2(VOCAB) * 20 * 64 / lut_bytes(tokens.numpy(), luts), rel=1e-6)
    assert result.tokens == 20 * 64 and result.time_ms > 0


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
    result = evaluate(model, tokens, luts, seq_len=32, batch_tokens=batch_tokens, device="cpu")
    expected = direct_loss(model, tokens.long())
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.bpb == pytest.approx(
        expected / math.log(2) * 23 * 32 / lut_bytes(val_tokens[: 23 * 32 + 1], luts)
    )


def test_model_mode_is_restored_and_bad_batch_refused(luts, val_tokens) -> None:
    tokens = torch.from_numpy(val_tokens[:129])
    model = Bigram()
    for training in (True, False):
        model.train(training)
        evaluate(model, tokens, luts, seq_len=32, batch_tokens=64, device="cpu")
        assert model.training is training
    with pytest.raises(ValueError, match="batch_tokens=16"):
        evaluate(model, tokens, luts, seq_len=32, batch_tokens=16, device="cpu")


class Context(nn.Module):
    """Logits from the token and a running mean of the embeddings before it: a model whose loss
    depends on how much context each target gets (unlike Bigram), built from plain torch ops."""

    def __init__(self, vocab_size: int = VOCAB, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(2 * dim, vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        history = e.cumsum(dim=1) / torch.arange(1, x.size(1) + 1)[None, :, None]
        return self.head(torch.cat([e, history], dim=-1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x).flatten(0, 1), y.reshape(-1))


def _rank_worker(
    rank: int, world_size: int, folder: Path, tokens: torch.Tensor, luts, strides: list[int]
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=world_size
    )
    try:
        results = []
        for stride in strides:
            result = evaluate(
                Context(), tokens, luts, seq_len=32, stride=stride, batch_tokens=64, rank=rank,
                world_size=world_size, device="cpu",
            )  # fmt: skip
            results.append([result.loss, result.bpb, result.tokens])
        (folder / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_with_one(luts, val_tokens, tmp_path: Path) -> None:
    tokens = torch.from_numpy(val_tokens[: 13 * 32 + 1])  # 13 sequences: an uneven split
    strides = [32, 12]  # separate windows, and overlapping ones (also an uneven split: 33 windows)
    mp.spawn(_rank_worker, args=(2, tmp_path, tokens, luts, strides), nprocs=2)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]
    for stride, (loss, bpb, scored) in zip(strides, results[0], strict=True):
        single = evaluate(Context(), tokens, luts, seq_len=32, stride=stride, batch_tokens=64, device="cpu")
        assert [loss, bpb] == pytest.approx([single.loss, single.bpb], rel=1e-9)
        assert scored == single.tokens == 13 * 32


# ------------------------------------------------------------------ sliding windows


@pytest.mark.parametrize(
    ("num_targets", "seq_len", "stride"),
    [(256, 32, 32), (256, 32, 8), (256, 32, 1), (250, 32, 7), (100, 48, 48), (100, 48, 5), (32, 32, 4)],
)
def test_windows_score_every_target_exactly_once_with_the_promised_context(
    num_targets: int, seq_len: int, stride: int
) -> None:
    starts, first_scored = sliding_windows(num_targets, seq_len, stride)
    times_scored = np.zeros(num_targets, dtype=int)
    for start, first in zip(starts.tolist(), first_scored.tolist(), strict=True):
        assert 0 <= start and start + seq_len <= num_targets  # every window is whole and inside the split
        times_scored[start + first : start + seq_len] += 1
        # A scored target at position p of its window sees the p tokens before it (and itself).
        assert first >= (0 if start == 0 else seq_len - stride)
    assert (times_scored == 1).all()
    # Windows `stride` apart, plus one more that ends on the last target when the stride leaves some over.
    spaced = (num_targets - seq_len) // stride + 1
    assert len(starts) == spaced + ((num_targets - seq_len) % stride != 0)


def test_windows_refuse_a_stride_or_length_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="stride=0"):
        sliding_windows(100, 32, 0)
    with pytest.raises(ValueError, match="stride=33"):
        sliding_windows(100, 32, 33)
    with pytest.raises(ValueError, match="do not fit in 20 validation targets; lower trainer.val_seq_len"):
        sliding_windows(20, 32, 32)


def reference_evaluation(model: nn.Module, tokens: torch.Tensor, luts, seq_len: int, batch_seqs: int):
    """parameter-golf's eval_val as speedrun ran it before sliding windows: consecutive batches of whole
    sequences, each batch's mean loss times its token count summed in float64, bytes from the tables."""
    loss_sum = token_count = byte_count = torch.zeros((), dtype=torch.float64)
    total_seqs = (tokens.numel() - 1) // seq_len
    with torch.no_grad():
        for first in range(0, total_seqs, batch_seqs):
            last = min(first + batch_seqs, total_seqs)
            chunk = tokens[first * seq_len : last * seq_len + 1].long()
            x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
            loss_sum = loss_sum + model(x, y).to(torch.float64) * float(y.numel())
            token_count = token_count + float(y.numel())
            byte_count = byte_count + count_target_bytes(x.reshape(-1), y.reshape(-1), luts)
    val_loss = (loss_sum / token_count).item()
    return val_loss, val_loss / math.log(2.0) * (token_count.item() / byte_count.item())


@pytest.mark.parametrize("batch_tokens", [32, 5 * 32, 10_000])
def test_a_stride_of_seq_len_is_the_reference_evaluation_bit_for_bit(
    luts, val_tokens, batch_tokens: int
) -> None:
    tokens = torch.from_numpy(val_tokens[: 23 * 32 + 1].astype(np.uint16))
    model = Context()
    expected = reference_evaluation(model, tokens, luts, 32, max(batch_tokens // 32, 1))
    for stride in (None, 32):
        result = evaluate(
            model, tokens, luts, seq_len=32, stride=stride, batch_tokens=batch_tokens, device="cpu"
        )
        assert (result.loss, result.bpb) == expected  # exactly: the same numbers as before windows existed
        assert result.tokens == 23 * 32


def per_target_losses(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """Each target's loss computed window by window with the model's logits, by a loop independent of
    `evaluate`: the window that scores target t is the one whose scored positions hold it."""
    num_targets = tokens.numel() - 1
    losses = torch.full((num_targets,), float("nan"), dtype=torch.float64)
    starts, first_scored = sliding_windows(num_targets, seq_len, stride)
    with torch.no_grad():
        for start, first in zip(starts.tolist(), first_scored.tolist(), strict=True):
            window = tokens[start : start + seq_len + 1].long()
            logits = model.logits(window[None, :-1])[0].double()
            nll = F.cross_entropy(logits, window[1:], reduction="none")
            losses[start + first : start + seq_len] = nll[first:]
    return losses


def test_a_smaller_stride_scores_each_target_once_with_more_context(luts, val_tokens) -> None:
    tokens = torch.from_numpy(val_tokens[: 40 * 32 + 1].astype(np.uint16))
    model = Context()
    for stride in (32, 8, 3):
        result = evaluate(model, tokens, luts, seq_len=32, stride=stride, batch_tokens=7 * 32, device="cpu")
        losses = per_target_losses(model, tokens, 32, stride)
        assert not losses.isnan().any() and result.tokens == 40 * 32
        assert result.loss == pytest.approx(losses.mean().item(), rel=1e-6)
        # Bytes of exactly the scored targets: here all of them, once each.
        assert result.bpb == pytest.approx(
            losses.sum().item() / math.log(2) / lut_bytes(val_tokens[: 40 * 32 + 1], luts), rel=1e-6
        )
    # A model without context (a bigram) scores the same whatever the windows: nothing counted twice or missed.
    flat = evaluate(Bigram(), tokens, luts, seq_len=32, batch_tokens=7 * 32, device="cpu")
    for seq_len, stride in ((32, 5), (48, 48), (20, 1)):
        windowed = evaluate(
            Bigram(), tokens, luts, seq_len=seq_len, stride=stride, batch_tokens=7 * 48, device="cpu"
        )
        assert (windowed.loss, windowed.bpb) == pytest.approx((flat.loss, flat.bpb), rel=1e-6)
        assert windowed.tokens == flat.tokens


def test_scored_bytes_leave_out_the_targets_not_scored(luts, val_tokens) -> None:
    tokens = torch.from_numpy(val_tokens[:65].astype(np.int64))
    x, y = tokens[:-1].reshape(2, 32), tokens[1:].reshape(2, 32)
    scored = torch.arange(32)[None, :] >= torch.tensor([0, 20])[:, None]
    expected = lut_bytes(val_tokens[:33], luts) + lut_bytes(val_tokens[32 + 20 : 65], luts)
    assert count_target_bytes(x, y, luts, scored).item() == expected


SHIPPED_MODELS = {
    "gpt": lambda: GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1),
    "modded": lambda: ModdedGPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_value_embeds=1,
                                skip_attention_layers=[], window_block_size=8, max_window_tokens=32, bos_id=1),
    "nanochat": lambda: NanochatGPT(vocab_size=64, depth=2, aspect_ratio=16, head_dim=16, sequence_len=32),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_every_shipped_model_leaves_ignored_targets_out_of_its_loss(name: str) -> None:
    torch.manual_seed(0)
    model = SHIPPED_MODELS[name]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # no zero-initialised head: every target has its own loss
    x, y = torch.randint(2, 64, (2, 32)), torch.randint(2, 64, (2, 32))
    scored = torch.arange(32)[None, :] >= torch.tensor([0, 24])[:, None]
    with torch.no_grad():
        expected = F.cross_entropy(model.logits(x).double().flatten(0, 1), y.flatten(), reduction="none")
        loss = model(x, torch.where(scored, y, IGNORE_INDEX))
    assert loss.item() == pytest.approx(expected[scored.flatten()].mean().item(), rel=1e-5)


# ------------------------------------------------------------------ through the trainer


def test_a_run_reports_its_evaluation_windows_time_and_scored_tokens(trained_run: Path, luts) -> None:
    summary = read_summary(trained_run)
    assert summary["val_tokens_scored"] == 8192  # data.val_tokens, each target once despite stride 32
    assert summary["eval_time_ms"] > 0 and summary["quant_eval_time_ms"] > 0
    validations = [r for r in read_metrics(trained_run) if "val/loss" in r]
    assert [r["step"] for r in validations] == [0, 20, 40] and all(r["val/time_ms"] > 0 for r in validations)
    assert validations[-1]["val/time_ms"] == summary["eval_time_ms"]
    quant = next(r for r in read_metrics(trained_run) if "quant/val_loss" in r)
    assert quant["quant/time_ms"] == summary["quant_eval_time_ms"]
    # The end checkpoint holds the weights of the final validation: evaluating them here with the run's
    # windows (seq 64, stride 32; 4096 val tokens per batch over 8 micro-steps) gives its numbers exactly,
    # and no overlap (the reference's evaluation) gives a higher loss on this trained model.
    state = load_checkpoint(CheckpointManager(trained_run / "checkpoints").paths()[0])
    model, data = instantiate(state["config"]["model"]), instantiate(state["config"]["data"])
    model.load_state_dict(state["model"])
    tokens = data.load_val_tokens()
    sliding = evaluate(model, tokens, luts, seq_len=64, stride=32, batch_tokens=512, device="cpu")
    assert (sliding.loss, sliding.bpb) == (summary["val_loss"], summary["val_bpb"])
    separate = evaluate(model, tokens, luts, seq_len=64, batch_tokens=512, device="cpu")
    assert separate.loss > sliding.loss and separate.tokens == sliding.tokens
    # A longer window (past the training length: RoPE extends) still scores every target once.
    longer = evaluate(model, tokens, luts, seq_len=96, stride=48, batch_tokens=512, device="cpu")
    assert longer.tokens == 8192 and math.isfinite(longer.loss)


def test_evaluation_and_samples_leave_training_alone_and_a_bad_stride_is_one_line(
    tmp_path: Path, trained_run: Path
) -> None:
    # The trained run's 40 steps again, with other windows, no samples, no export, no wandb.
    run_train(tmp_path / "run", "trainer.max_steps=40", "trainer.val_every=0", "trainer.val_seq_len=128",
              "trainer.val_stride=96", "trainer.export=false")  # fmt: skip
    summary = read_summary(tmp_path / "run")
    # 8192 targets in windows of 128: every one scored once (the last window ends on the last target).
    assert summary["status"] == "completed" and summary["val_tokens_scored"] == 8192
    assert summary["val_loss"] != read_summary(trained_run)["val_loss"]  # another evaluation...
    # ... of the same training, step for step: neither the windows nor the samples change what is learnt.
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert losses == [(r["step"], r["train/loss"]) for r in read_metrics(trained_run) if "train/loss" in r]
    for bad_value in ("trainer.val_stride=65", "trainer.val_seq_len=8200"):
        bad = run_train(tmp_path / "bad", bad_value, check=False)
        errors = [line for line in (bad.stdout + bad.stderr).splitlines() if line.startswith("error:")]
        assert bad.returncode != 0 and len(errors) == 1
        assert bad_value in errors[0] and "Traceback" not in bad.stdout + bad.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sliding_windows_on_cuda_with_a_compiled_model_agree_with_the_cpu(luts, val_tokens) -> None:
    tokens = torch.from_numpy(val_tokens[: 40 * 64 + 1].astype(np.uint16))
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    cpu = evaluate(model, tokens, luts, seq_len=64, stride=16, batch_tokens=8 * 64, device="cpu")
    compiled = torch.compile(model.cuda(), dynamic=False, fullgraph=True)
    cuda_luts = tuple(t.cuda() for t in luts)
    gpu = evaluate(compiled, tokens, cuda_luts, seq_len=64, stride=16, batch_tokens=8 * 64, device="cuda")
    assert gpu.tokens == cpu.tokens == 40 * 64
    assert (gpu.loss, gpu.bpb) == pytest.approx((cpu.loss, cpu.bpb), rel=1e-3)
