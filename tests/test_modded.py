"""modded-nanogpt's record-#20 model, its optimizer and its preset, each against an independent computation.

The record's facts come from its train_gpt.py (KellerJordan/modded-nanogpt, records/011625_Sub3Min).
GPU-only paths (compiled FlexAttention, the FP8 head, compiling the model) run where CUDA is.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from speedrun.config import ConfigError, compose, validate_config
from speedrun.models import ModdedGPT
from speedrun.models.attention import dense_window_mask, document_ids, flex_block_mask, windowed_attention
from speedrun.models.modded import apply_rotary, value_embed_plan, window_plan
from speedrun.models.protocol import parameter_counts, parameter_groups
from speedrun.optim import BatchedMuon, ModdedMuonAdam
from speedrun.optim.batched_muon import batched_newton_schulz
from speedrun.optim.muon import zeropower_via_newtonschulz5
from speedrun.schedules import WallclockWarmdown
from tests.conftest import REPO, cli_env, read_metrics, read_summary
from tests.two_ranks import on_two_ranks, run_steps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(vocab_size=1000, num_layers=4, model_dim=64, num_heads=2, num_value_embeds=1,
             skip_attention_layers=[2], window_block_size=16, max_window_tokens=64, bos_id=1)  # fmt: skip


def small_model(seed: int = 0, randomize: bool = False, **overrides) -> ModdedGPT:
    """A small ModdedGPT; `randomize` replaces the zero/identity init so every path carries signal."""
    torch.manual_seed(seed)
    model = ModdedGPT(**{**SMALL, **overrides})
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
    return model


# --------------------------------------------------------------------------- sizes


def test_the_record_model_has_the_records_parameter_counts():
    vocab, padded, dim, layers, heads_skipped, value_embeds = 50257, 50304, 768, 12, 1, 3
    attention_layers = layers - heads_skipped
    # Counted from the record's module list: embeddings, head, Q/K/V + output projection, 4x MLP, scalars.
    expected = {
        "embed": (1 + value_embeds) * vocab * dim,
        "head": padded * dim,
        "matrix": attention_layers * (3 * dim * dim + dim * dim) + layers * (2 * 4 * dim * dim),
        "scalar": attention_layers * 2 + layers * 2 + layers // 2,
    }
    with torch.device("meta"):  # shapes only: no memory for 275 M parameters
        model = ModdedGPT()
    counts = parameter_counts(model)
    assert counts == {"total": sum(expected.values()), **expected}
    assert counts == {"total": 275_598_388, "embed": 154_389_504, "head": 38_633_472,
                      "matrix": 82_575_360, "scalar": 52}  # fmt: skip
    assert model.lm_head.weight.shape == (50304, 768)


def test_flops_per_token_counts_matmuls_and_the_warmed_up_windows():
    with torch.device("meta"):
        model = ModdedGPT()
    counts = parameter_counts(model)
    # Long windows (1,792 tokens) at layers 0, 4, 11 (7 has no attention), short ones (896) at the other 8.
    attention = 12 * 768 * (3 * 1792 + 8 * 896)
    assert model.flops_per_token(65536) == 6 * (counts["matrix"] + counts["head"]) + attention
    # A sequence shorter than a window bounds it.
    assert model.flops_per_token(512) == 6 * (counts["matrix"] + counts["head"]) + 12 * 768 * 11 * 512


# --------------------------------------------------------------------------- attention


def explicit_allowed(tokens: np.ndarray, bos_id: int, window_blocks: int, block: int) -> np.ndarray:
    """The record's rule written out: (batch, T, T) True where query q may see key k."""
    batch, length = tokens.shape
    allowed = np.zeros((batch, length, length), dtype=bool)
    for b in range(batch):
        doc, docs = 0, []
        for token in tokens[b]:
            doc += int(token == bos_id)
            docs.append(doc)
        for q in range(length):
            for k in range(q + 1):
                allowed[b, q, k] = docs[q] == docs[k] and q // block - k // block < window_blocks
    return allowed


def explicit_attention(q, k, v, allowed: np.ndarray, scale: float) -> torch.Tensor:
    """Softmax attention in float64 with -inf outside `allowed` (batch, T, T)."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = scale * q @ k.transpose(-1, -2)
    scores = scores.masked_fill(~torch.from_numpy(allowed)[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def packed_rows(length: int = 128, bos_id: int = 1) -> torch.Tensor:
    """Two packed rows: documents of various lengths, boundaries inside blocks and on their edges,
    a one-token document, and a row that starts mid-document."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 50, (2, length), generator=g)
    for row, starts in enumerate([(0, 21, 32, 33, 90), (15, 16, 64, 100)]):
        tokens[row, [i for i in starts if i < length]] = bos_id
    return tokens


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 8])
def test_dense_window_mask_is_the_records_rule(window_blocks):
    tokens = packed_rows()
    mask = dense_window_mask(document_ids(tokens, 1), torch.tensor(window_blocks), block_size=16)
    assert mask.shape == (2, 1, 128, 128)
    assert np.array_equal(mask[:, 0].numpy(), explicit_allowed(tokens.numpy(), 1, window_blocks, 16))


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 8])
def test_windowed_attention_equals_attention_under_the_explicit_mask(window_blocks):
    tokens = packed_rows()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 128, 8, generator=g) for _ in range(3))
    allowed = explicit_allowed(tokens.numpy(), 1, window_blocks, 16)
    want = explicit_attention(q, k, v, allowed, scale=0.12)
    dense = dense_window_mask(document_ids(tokens, 1), torch.tensor(window_blocks), 16)
    assert torch.allclose(windowed_attention(q, k, v, dense, 0.12).double(), want, atol=1e-5)


def kv_lists_to_dense(counts: torch.Tensor, indices: torch.Tensor) -> np.ndarray:
    """FlexAttention's per-query-block KV lists -> (batch, Q blocks, KV blocks) booleans."""
    batch, _, rows = counts.shape
    dense = np.zeros((batch, rows, indices.size(-1)), dtype=bool)
    for b in range(batch):
        for row in range(rows):
            dense[b, row, indices[b, 0, row, : counts[b, 0, row]].numpy()] = True
    return dense


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 8])
def test_flex_block_lists_skip_exactly_the_blocks_the_rule_hides(window_blocks):
    """The compiled kernel trusts the block lists: a listed "full" block is attended without the
    per-token test, an unlisted block not at all."""
    tokens, block = packed_rows(), 16
    mask = flex_block_mask(document_ids(tokens, 1), torch.tensor(window_blocks), block)
    allowed = explicit_allowed(tokens.numpy(), 1, window_blocks, block)
    per_block = allowed.reshape(2, 8, block, 8, block).transpose(0, 1, 3, 2, 4).reshape(2, 8, 8, -1)
    partial = kv_lists_to_dense(mask.kv_num_blocks, mask.kv_indices)
    full = kv_lists_to_dense(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    assert np.array_equal(full, per_block.all(axis=-1))
    assert np.array_equal(partial | full, per_block.any(axis=-1))


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 8])
def test_flex_block_mask_gives_the_same_attention(window_blocks):
    """The CUDA path's BlockMask through uncompiled FlexAttention on the CPU (which applies its per-token
    test to every pair; the test above checks the block lists the compiled kernel adds)."""
    from torch.nn.attention.flex_attention import flex_attention

    tokens = packed_rows()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 128, 8, generator=g) for _ in range(3))
    block_mask = flex_block_mask(document_ids(tokens, 1), torch.tensor(window_blocks), 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile": expected here
        got = flex_attention(q, k, v, block_mask=block_mask, scale=0.12)
    want = explicit_attention(q, k, v, explicit_allowed(tokens.numpy(), 1, window_blocks, 16), 0.12)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_tokens_of_one_document_do_not_change_another_documents_logits():
    model = small_model(randomize=True).eval()
    model.set_progress(1.0)  # the widest windows
    tokens = packed_rows(length=64)[:1]
    tokens[0, 40] = 1  # a document starts at 40
    changed = tokens.clone()
    changed[0, 10:40] = torch.randint(2, 50, (30,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before, after = model.logits(tokens), model.logits(changed)
    assert torch.equal(before[0, 40:], after[0, 40:])
    assert not torch.allclose(before[0, 10:40], after[0, 10:40])


def test_any_length_runs_and_a_prefix_gets_the_same_logits():
    """Causal, so the first 40 tokens' logits do not depend on what follows (40 is not a whole number
    of blocks: sampling's growing sequences take the dense path)."""
    model = small_model(randomize=True).eval()
    model.set_progress(0.5)
    tokens = packed_rows(length=64)
    with torch.no_grad():
        assert torch.allclose(model.logits(tokens[:, :40]), model.logits(tokens)[:, :40], atol=1e-5)


def test_a_training_length_that_is_not_whole_blocks_is_refused_before_any_work():
    cfg = compose(["experiment=mn_record20", "data=stdlib", "data.seq_len=1000"])
    with pytest.raises(
        ConfigError, match=re.escape("data.seq_len=1000 is not a whole number of model.window_block_size=128")
    ):
        validate_config(cfg)


def test_windows_warm_up_with_progress_as_the_record():
    model = ModdedGPT(**SMALL | dict(window_block_size=128, max_window_tokens=1728))
    steps = 1393
    for step in range(steps + 1):
        model.set_progress(step / steps)
        # The record: the smallest multiple of 128 (and at least 128) >= 1728 * step / 1393, in blocks.
        want = max(1, -(-1728 * step // (steps * 128)))
        assert int(model.window_blocks) == want, step
    assert int(model.window_blocks) == 14  # 1,792 tokens at the end
    short = torch.clamp_min(model.window_blocks // 2, 1)
    assert int(short) == 7


@pytest.mark.parametrize(
    ("layers", "pattern", "expected"),
    [
        (12, "LSSSLS", "LSSSLSSLSSSL"),  # the record: [long, short, short, short, long, short], then reversed
        (4, "LSSSLS", "LSSL"),
        (7, "LS", "LSLSLSL"),
        (5, "L", "LLLLL"),
    ],
)
def test_window_pattern_is_tiled_over_the_first_half_and_mirrored(layers, pattern, expected):
    assert "".join("L" if long else "S" for long in window_plan(layers, pattern)) == expected


def test_rope_rotates_half_the_dimensions_at_the_records_frequencies():
    head_dim, length = 16, 40
    model = ModdedGPT(**SMALL | dict(model_dim=2 * head_dim))
    cos, sin = model.rotary.tables(length)
    x = torch.randn(1, length, 2, head_dim, generator=torch.Generator().manual_seed(4))
    got = apply_rotary(x, cos, sin)
    # Pairs (i, i + head_dim/2) rotate by -position x freq_i: freq_i = 1024^(-i / (head_dim/4 - 1)) for
    # the first head_dim/4 pairs, 0 (no rotation) for the rest.
    quarter = head_dim // 4
    freqs = np.concatenate([1024.0 ** (-np.arange(quarter) / (quarter - 1)), np.zeros(quarter)])
    angles = np.arange(length)[:, None] * freqs[None, :]
    z = x[..., : 2 * quarter].double().numpy() + 1j * x[..., 2 * quarter :].double().numpy()
    rotated = z * np.exp(-1j * angles)[None, :, None, :]
    want = np.concatenate([rotated.real, rotated.imag], axis=-1)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert torch.equal(got[..., quarter : 2 * quarter], x[..., quarter : 2 * quarter])


# --------------------------------------------------------------------------- QKV and value embeddings


def test_merged_qkv_equals_separate_projections_with_the_stacked_weights():
    model = small_model(randomize=True)
    attn = model.blocks[0].attn
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(5))
    ve = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(6))
    q, k, v = attn.project(x, ve)
    w_q, w_k, w_v = attn.qkv_w.detach()
    heads = lambda t: t.view(2, 32, 2, 32)  # noqa: E731 - (batch, T, heads, head_dim)
    lam = attn.lambdas.detach()
    assert torch.allclose(q, heads(x @ w_q.T), atol=1e-5)
    assert torch.allclose(k, heads(x @ w_k.T), atol=1e-5)
    # The value embedding enters the values, mixed by the layer's two lambdas.
    assert torch.allclose(v, heads(lam[0] * (x @ w_v.T) + lam[1] * ve), atol=1e-5)
    _, _, v_alone = attn.project(x, None)
    assert torch.allclose(v_alone, heads(lam[0] * (x @ w_v.T)), atol=1e-5)


def test_value_embedding_plans():
    assert value_embed_plan(12, 3, None) == (0, 1, 2, None, None, None, None, None, None, 0, 1, 2)
    assert value_embed_plan(6, 2, None) == (0, 1, None, None, 0, 1)
    assert value_embed_plan(4, 0, None) == (None,) * 4
    assert value_embed_plan(4, 2, [1, -1, 0, 1]) == (1, None, 0, 1)


def test_value_embeddings_add_exactly_their_tables():
    six_layers = SMALL | dict(num_layers=6, skip_attention_layers=[])
    base = parameter_counts(ModdedGPT(**six_layers | dict(num_value_embeds=0)))
    for count in (1, 2, 3):
        counts = parameter_counts(ModdedGPT(**six_layers | dict(num_value_embeds=count)))
        assert counts["total"] - base["total"] == count * 1000 * 64
        assert counts["embed"] - base["embed"] == count * 1000 * 64
        assert {k: counts[k] for k in ("head", "matrix", "scalar")} == {
            k: base[k] for k in ("head", "matrix", "scalar")
        }


def test_each_value_embedding_enters_first_where_the_plan_puts_it():
    """Perturb value embedding j: block outputs before its first layer are untouched, that layer's changes."""
    model = small_model(randomize=True, num_layers=6, num_value_embeds=2, skip_attention_layers=[])
    model.eval()
    tokens = packed_rows(length=32)
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, i, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        model.logits(tokens)
        reference = list(outputs)
        for j, first_layer in [(0, 0), (1, 1)]:  # the plan: (0, 1, None, None, 0, 1)
            outputs.clear()
            original = model.value_embeds[j].weight.clone()
            model.value_embeds[j].weight.add_(1.0)
            model.logits(tokens)
            model.value_embeds[j].weight.copy_(original)
            for layer in range(first_layer):
                assert torch.equal(outputs[layer], reference[layer])
            assert not torch.allclose(outputs[first_layer], reference[first_layer])
    for hook in hooks:
        hook.remove()


def test_skipped_attention_layers_have_no_attention():
    with_all = small_model(skip_attention_layers=[])
    skipped = small_model(skip_attention_layers=[2])
    assert skipped.blocks[2].attn is None and all(b.attn is not None for b in with_all.blocks)
    # One attention's weights fewer: Q, K, V, the output projection and the two value lambdas.
    assert parameter_counts(with_all)["total"] - parameter_counts(skipped)["total"] == 4 * 64 * 64 + 2


def test_logits_are_the_soft_cap_of_15_shifted_by_15_over_the_padded_vocabulary():
    model = small_model(randomize=True).eval()
    raw = []
    model.lm_head.register_forward_hook(lambda m, i, out: raw.append(out))
    with torch.no_grad():
        logits = model.logits(packed_rows(length=32))
    assert logits.shape == (2, 32, 1024)  # 1000 rounded up to a multiple of 128
    assert torch.allclose(logits.double(), 15 * torch.tanh(raw[0].double() / 15) + 15, atol=1e-5)
    # Zero-initialised head: every logit 15 at the start, the loss log(1024).
    fresh = small_model()
    loss = fresh(packed_rows(length=32), packed_rows(length=32))
    assert loss.item() == pytest.approx(math.log(1024), abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(skip_attention_layers=[7]), "model.skip_attention_layers=[7] names layers [7]"),
        (dict(num_value_embeds=3), "model.num_value_embeds=3 needs 6 layers"),
        (dict(skip_attention_layers=[0]), "drops the attention of layers [0], which add a value embedding"),
        (dict(value_embed_layers=[0, 0, 1, 0], num_value_embeds=1), "a value embedding in 0..0"),
        (dict(window_pattern="LXS"), "model.window_pattern='LXS'"),
        (dict(model_dim=36, num_heads=2), "divisible by 4"),
        (dict(bos_id=50256), "model.bos_id=50256 is outside the vocabulary"),
    ],
)
def test_bad_options_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModdedGPT(**SMALL | overrides)


def test_fp8_head_falls_back_with_one_logged_line_off_a_capable_gpu(caplog):
    model = small_model()
    with caplog.at_level(logging.INFO, logger="speedrun"):
        model.cast_for_mixed_precision()
    if torch.cuda.is_available():
        pytest.skip("this machine may run the FP8 head")
    assert not model.use_fp8_head
    assert [r.getMessage() for r in caplog.records] == [
        "model.fp8_head: off, the head matmul runs in bf16 (the head is on cpu, not a CUDA GPU)"
    ]
    assert model.embed.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(packed_rows(length=32), packed_rows(length=32)))


# --------------------------------------------------------------------------- optimizer


def newton_schulz_float64(matrix: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic iteration in float64 on one matrix (what bf16 approximates)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 24, 8), (8, 24)])
def test_batched_newton_schulz_orthogonalises_each_matrix_on_its_own(shape):
    grads = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    got = batched_newton_schulz(grads).float()
    flat_in, flat_out = grads.reshape(-1, *shape[-2:]), got.reshape(-1, *shape[-2:])
    for g, out in zip(flat_in, flat_out, strict=True):
        # bf16 through five iterations: a few percent from the exact iteration.
        want = newton_schulz_float64(g.double().numpy())
        assert np.linalg.norm(out.numpy() - want) / np.linalg.norm(want) < 0.06
        # parameter-golf's 2-D implementation, matrix by matrix, gives the same bits (on the CPU).
        assert torch.equal(out, zeropower_via_newtonschulz5(g).float())


def test_batched_muon_steps_are_the_records_update():
    g = torch.Generator().manual_seed(8)
    param = torch.nn.Parameter(torch.randn(3, 12, 8, generator=g))
    grads = [torch.randn(3, 12, 8, generator=g) for _ in range(3)]
    lr, start, final, warmup = 0.05, 0.85, 0.95, 2
    opt = BatchedMuon(
        [param], lr=lr, momentum=final, momentum_warmup_start=start, momentum_warmup_steps=warmup
    )
    want = param.detach().double().clone()
    buf = torch.zeros_like(want)
    for step, grad in enumerate(grads):
        param.grad = grad.clone()
        opt.step()
        frac = min(step / warmup, 1.0)
        momentum = (1 - frac) * start + frac * final
        buf = momentum * buf + (1 - momentum) * grad.double()  # an average, not a sum
        nesterov = (1 - momentum) * grad.double() + momentum * buf
        update = torch.stack([zeropower_via_newtonschulz5(m.float()).double() for m in nesterov])
        want -= lr * math.sqrt(12 / 8) * update  # tall matrices take a larger step
        assert torch.allclose(param.detach().double(), want, atol=2e-3), step
    assert opt.param_groups[0]["steps_taken"] == 3


def test_modded_optimizer_has_the_records_groups_and_settings():
    model = small_model()
    opt = ModdedMuonAdam(parameter_groups(model))
    adam, muon = opt.optimizers["adam"], opt.optimizers["muon"]
    assert [(g["name"], g["lr"]) for g in adam.param_groups] == [
        ("head", 0.008),
        ("embed", 0.6),
        ("scalar", 0.04),
    ]
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    assert adam.defaults["weight_decay"] == 0
    names = {id(p): name for name, p in model.named_parameters()}
    embed = [names[id(p)] for p in adam.param_groups[1]["params"]]
    assert embed == ["embed.weight", "value_embeds.0.weight"]
    matrices = [names[id(p)] for p in muon.param_groups[0]["params"]]
    assert matrices == [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2]
    assert model.blocks[0].attn.qkv_w.ndim == 3 and names[id(model.blocks[0].attn.qkv_w)] in matrices
    assert muon.param_groups[0]["lr"] == 0.05 and muon.param_groups[0]["momentum_warmup_steps"] == 300
    covered = [p for group in opt.param_groups for p in group["params"]]
    assert sorted(map(id, covered)) == sorted(id(p) for p in model.parameters())


def _batched_muon_problem():
    g = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(3, 8, 8), (16, 8), (2, 8, 12)]]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    return params, grads


def _make_batched_muon(params) -> BatchedMuon:
    return BatchedMuon(params, lr=0.05, momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_steps=1)


@pytest.mark.slow  # two fresh processes importing torch: several seconds
def test_two_rank_batched_muon_matches_one_rank(tmp_path):
    results = on_two_ranks(_batched_muon_problem, _make_batched_muon, tmp_path)
    params, grads = _batched_muon_problem()
    single = run_steps(_make_batched_muon, params, grads).state_dict()
    for result in results:
        for got, want in zip(result["params"], params, strict=True):
            assert torch.equal(got, want.detach())
        for index, state in single["state"].items():
            assert torch.equal(result["state"]["state"][index]["momentum_buffer"], state["momentum_buffer"])


# --------------------------------------------------------------------------- schedule


def test_warmdown_to_a_floor_follows_the_records_schedule():
    """The record: w = min((1 - step / 1393) / 0.4, 1), lr = w + (1 - w) * 0.1. Here the decay spans
    round(0.4 x 1393) = 557 steps rather than 557.2, which moves the multiplier by at most
    0.9 x 0.2 / 557.2 = 0.00032."""
    steps = 1393
    schedule = WallclockWarmdown(
        max_steps=steps, max_wallclock_ms=None, warmdown_fraction=0.4, final_lr_frac=0.1
    )
    for step in range(steps):
        w = min((1 - step / steps) / 0.4, 1.0)
        assert schedule.lr_scale(step, 0.0) == pytest.approx(w + (1 - w) * 0.1, abs=4e-4), step
    assert schedule.lr_scale(0, 0.0) == 1.0 and schedule.lr_scale(835, 0.0) == 1.0
    assert schedule.lr_scale(steps - 1, 0.0) == pytest.approx(0.1 + 0.9 / 557)


def test_warmdown_to_a_floor_by_time():
    schedule = WallclockWarmdown(
        max_steps=None, max_wallclock_ms=1000.0, warmdown_fraction=0.5, final_lr_frac=0.2
    )
    assert schedule.lr_scale(10, 400.0) == 1.0
    assert schedule.lr_scale(10, 750.0) == pytest.approx(0.5 + 0.5 * 0.2)  # half of the decay left
    assert schedule.lr_scale(10, 1000.0) == pytest.approx(0.2)


# --------------------------------------------------------------------------- the preset, through the CLI

# experiment=mn_record20 shrunk for a CPU: 2 layers x 64 on the embedded corpus (vocab 1024, BOS 1),
# sequences of 256 tokens in windows of 32-token blocks, 8 micro-steps of one sequence per step.
TINY_RECORD = [
    "experiment=mn_record20",
    "data=stdlib",
    "model.vocab_size=1024",
    "model.bos_id=1",
    "model.num_layers=2",
    "model.model_dim=64",
    "model.num_heads=2",
    "model.num_value_embeds=1",
    "model.skip_attention_layers=[]",
    "model.window_block_size=32",
    "model.max_window_tokens=192",
    "data.seq_len=256",
    "data.val_tokens=8192",
    "trainer.train_batch_tokens=2048",
    "trainer.val_batch_tokens=4096",
    "trainer.max_steps=24",
    "trainer.val_every=12",
    "trainer.warmup_steps=0",
    "logger=none",
]


def train_cli(run_dir, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "speedrun.train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.usefixtures("corpus")
def test_the_record_preset_trains_on_a_cpu_with_tiny_overrides(tmp_path):
    run_dir = tmp_path / "run"
    train_cli(run_dir, *TINY_RECORD)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 24
    val = [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r]
    assert val[0] == pytest.approx(math.log(1024), abs=1e-3)  # zero-initialised head: uniform
    assert val[-1] < val[0] - 1.0, val
    # The decay to a floor: round(0.4 x 24) = 10 decay steps, so step 20 runs at 0.1 + 0.9 x 4 / 10.
    lr_scale = {r["step"]: r["lr_scale"] for r in read_metrics(run_dir) if "lr_scale" in r}
    assert lr_scale[10] == 1.0 and lr_scale[20] == pytest.approx(0.1 + 0.9 * 0.4)
    assert not (run_dir / "final_model.int8.ptz").exists()  # the record writes no artifact


def test_cfg_job_shows_the_records_resolved_settings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "speedrun.train", "experiment=mn_record20", "--cfg", "job"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["_target_"] == "speedrun.models.ModdedGPT"
    model_keys = ("vocab_size", "num_layers", "model_dim", "num_heads", "skip_attention_layers")
    assert {k: cfg["model"][k] for k in model_keys} == {
        "vocab_size": 50257, "num_layers": 12, "model_dim": 768, "num_heads": 6, "skip_attention_layers": [7],
    }  # fmt: skip
    assert (
        cfg["optimizer"]["_target_"] == "speedrun.optim.ModdedMuonAdam" and cfg["optimizer"]["eps"] == 1e-10
    )
    assert cfg["schedule"]["warmdown_fraction"] == 0.4 and cfg["schedule"]["final_lr_frac"] == 0.1
    assert cfg["data"]["seq_len"] == 65536 and cfg["data"]["val_tokens"] == 10485760
    trainer_keys = ("train_batch_tokens", "max_steps", "max_wallclock_seconds", "val_every")
    assert {k: cfg["trainer"][k] for k in trainer_keys} == {
        "train_batch_tokens": 524288, "max_steps": 1393, "max_wallclock_seconds": 0.0, "val_every": 125,
    }  # fmt: skip


@pytest.mark.usefixtures("corpus")
def test_an_option_that_does_not_fit_the_depth_is_one_error_line(tmp_path):
    overrides = [o for o in TINY_RECORD if not o.startswith("model.skip_attention_layers")]
    proc = train_cli(tmp_path / "run", *overrides, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: ValueError: model.skip_attention_layers=[7] names layers [7], but model.num_layers=2 has "
        "layers 0..1; pick layers in range, or [] to keep attention everywhere"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the progress hook

PROGRESS_MODEL = '''
import torch
import torch.nn.functional as F
import yaml
from torch import nn


class ProgressRecorder(nn.Module):
    """A bigram model that writes down every fraction the trainer tells it."""

    def __init__(self, vocab_size: int, path: str):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)
        self.path = path

    def set_progress(self, fraction):
        with open(self.path, "a") as f:
            f.write(f"{fraction}\\n")

    def forward(self, input_ids, target_ids):
        logits = self.embed(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))
'''


@pytest.mark.usefixtures("corpus")
def test_the_trainer_tells_the_model_its_progress_before_each_step_and_evaluation(tmp_path):
    (tmp_path / "progress_model.py").write_text(PROGRESS_MODEL)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    log_path = tmp_path / "progress.txt"
    (conf / "recorder.yaml").write_text(
        f"_target_: progress_model.ProgressRecorder\nvocab_size: 1024\npath: {log_path}\n"
    )
    cmd = [sys.executable, "-m", "speedrun.train", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
           "model=recorder", "optimizer=adamw", "data.seq_len=64", "data.val_tokens=2048",
           "trainer.train_batch_tokens=512", "trainer.val_batch_tokens=1024", "trainer.max_steps=4",
           "trainer.val_every=2", "trainer.max_wallclock_seconds=0", "trainer.export=false", "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    env = cli_env(PYTHONPATH=str(tmp_path))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    told = [float(line) for line in log_path.read_text().split()]
    # eval@0, step 0, step 1, eval@2, step 2, step 3, the final eval: steps done / max_steps.
    assert told == [0.0, 0.0, 0.25, 0.5, 0.5, 0.75, 1.0]


# --------------------------------------------------------------------------- GPU-only paths


@pytest.mark.gpu
@cuda
def test_compiled_flex_attention_on_cuda_equals_the_dense_path():
    tokens = packed_rows(length=1024).cuda()
    docs = document_ids(tokens, 1)
    g = torch.Generator(device="cuda").manual_seed(10)
    q, k, v = (
        torch.randn(2, 4, 1024, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)
    )
    for window in (1, 3, 8):
        blocks = torch.tensor(window, device="cuda")
        flex = windowed_attention(q, k, v, flex_block_mask(docs, blocks, 128), 0.12)
        dense = windowed_attention(q, k, v, dense_window_mask(docs, blocks, 128), 0.12)
        assert torch.allclose(flex.float(), dense.float(), atol=2e-2), window


@pytest.mark.gpu
@cuda
def test_fp8_head_matches_the_bf16_matmul_where_the_gpu_has_fp8():
    from speedrun.models.modded_fp8 import fp8_linear, fp8_unavailable

    weight = torch.nn.Parameter(torch.randn(1024, 256, device="cuda") * 0.05)
    if reason := fp8_unavailable(weight):
        pytest.skip(reason)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = fp8_linear(x, weight)
    want = F.linear(x.float(), weight.float())
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).norm() / want.norm() < 0.05
    out.float().square().sum().backward()
    x_ref = x.detach().float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_()
    F.linear(x_ref, w_ref).square().sum().backward()
    assert (x.grad.float() - x_ref.grad).norm() / x_ref.grad.norm() < 0.1
    assert weight.grad.dtype == torch.float32
    assert (weight.grad - w_ref.grad).norm() / w_ref.grad.norm() < 0.1


@pytest.mark.gpu
@cuda
def test_the_compiled_model_on_cuda_matches_eager():
    model = small_model(randomize=True, window_block_size=128, max_window_tokens=512).cuda()
    model.cast_for_mixed_precision()
    model.set_progress(0.5)
    tokens = packed_rows(length=1024).cuda()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_loss = model(tokens, tokens)
        compiled_loss = compiled(tokens, tokens)
    assert abs(eager_loss.item() - compiled_loss.item()) < 2e-2
    compiled_loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
