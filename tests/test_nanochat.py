"""nanochat's model and optimizer (model=nanochat, optimizer=nanochat, experiment=nanochat_d12), and the
Muon options of muon_adam, each checked against an independent computation."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from speedrun.job import resolve_max_steps
from speedrun.models import GPT
from speedrun.models.gpt import apply_rotary_emb
from speedrun.models.nanochat import (
    CausalSelfAttention,
    NanochatGPT,
    nanochat_shape,
    rotary_tables,
    window_sizes,
    windowed_causal_attention,
)
from speedrun.models.protocol import parameter_counts, parameter_groups, parameter_roles
from speedrun.optim import Muon, MuonAdam
from speedrun.optim.muon import current_momentum, decayed_step, zeropower_via_newtonschulz5
from speedrun.optim.nanochat import NanochatMuonAdamW, batch_lr_scale
from speedrun.optim.nanochat_muon import (
    POLAR_EXPRESS_COEFFICIENTS,
    NanochatMuon,
    normalize_variance,
    polar_express,
)
from tests.conftest import REPO, cli_env, read_metrics
from tests.two_ranks import on_two_ranks, run_steps

# A nanochat small enough for a CPU: 2 layers of 64 (one head of 64), 64-token sequences.
TINY = dict(vocab_size=1000, depth=2, aspect_ratio=32, head_dim=64, sequence_len=64)


def tiny_nanochat(seed: int = 0, **overrides) -> NanochatGPT:
    torch.manual_seed(seed)
    return NanochatGPT(**{**TINY, **overrides})


def on_meta(**settings) -> NanochatGPT:
    """A full-size model without allocating it (shapes only), as nanochat counts its parameters."""
    with torch.device("meta"):
        return NanochatGPT(**settings)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("depth", "aspect_ratio", "head_dim", "model_dim", "num_heads"),
    [
        (12, 64, 128, 768, 6),  # nanochat's d12
        (20, 64, 128, 1280, 10),  # its default depth
        (26, 64, 128, 1664, 13),
        (3, 64, 128, 256, 2),  # 192 nudged up to 2 heads of 128
        (5, 64, 128, 384, 3),  # 320 -> 384
        (7, 64, 96, 480, 5),  # 448 -> 5 heads of 96
        (2, 32, 64, 64, 1),
    ],
)
def test_depth_sizing_reproduces_nanochats_formula(depth, aspect_ratio, head_dim, model_dim, num_heads):
    # nanochat: base = depth * aspect_ratio, rounded up to a whole number of head_dim-wide heads.
    assert model_dim == math.ceil(depth * aspect_ratio / head_dim) * head_dim
    shape = nanochat_shape(depth, aspect_ratio, head_dim)
    assert (shape.model_dim, shape.num_heads, shape.head_dim) == (model_dim, num_heads, head_dim)
    model = on_meta(depth=depth, aspect_ratio=aspect_ratio, head_dim=head_dim)
    assert len(model.transformer.h) == depth
    assert model.transformer.wte.weight.shape == (32768, model_dim)
    block = model.transformer.h[0]
    assert block.attn.c_q.weight.shape == block.attn.c_k.weight.shape == (num_heads * head_dim, model_dim)
    assert block.mlp.c_fc.weight.shape == (4 * model_dim, model_dim)


def test_the_derived_shapes_are_logged(caplog):
    with caplog.at_level("INFO", logger="speedrun"):
        on_meta(depth=3)
    assert "depth 3 -> model_dim 256 (base 192, nudge +64), 2 heads x 128, mlp 1024" in caplog.text
    assert "windows [1024, 1024, 2048], value embeddings on layers [0, 2]" in caplog.text


def nanochat_parameter_count(depth: int, vocab: int = 32768) -> tuple[int, int]:
    """(total, scaling) from nanochat's architecture, written out: token embedding, head, 12·d² of
    matrices per block (q, k, v, proj: 4·d²; MLP: 8·d²), a value embedding and a 32 x heads gate on
    every other layer (the last included), and two scalars per layer."""
    d = math.ceil(depth * 64 / 128) * 128
    heads = d // 128
    value_layers = (depth + 1) // 2
    matrices = depth * 12 * d * d + value_layers * 32 * heads
    head = vocab * d
    total = vocab * d + head + matrices + value_layers * vocab * d + 2 * depth
    return total, matrices + head


def test_parameter_counts_are_nanochats():
    assert nanochat_parameter_count(12) == (286_262_424, 110_101_632)
    assert nanochat_parameter_count(20)[0] == 896_535_720
    for depth in (12, 20, 3):
        counts = parameter_counts(on_meta(depth=depth))
        assert (counts["total"], counts["matrix"] + counts["head"]) == nanochat_parameter_count(depth)


def test_d12_horizon_counts_scaling_parameters_as_nanochat_does():
    counts = parameter_counts(on_meta(depth=12))
    trainer = SimpleNamespace(
        max_steps=0, target_flops=0.0, target_param_data_ratio=10.5, train_batch_tokens=2**19
    )
    # base_train.py: int(10.5 * 110,101,632) // 524,288 = 2,205 steps.
    assert resolve_max_steps(trainer, 1.0, counts["matrix"] + counts["head"]) == 2205


def test_flops_per_token_is_nanochats_estimate():
    model = on_meta(depth=12)
    counts = parameter_counts(model)
    # 6 per matmul weight + 12·heads·head_dim·window per layer: SSSL over 12 layers = 9 short (1024), 3 long.
    attention = 12 * 6 * 128 * (9 * 1024 + 3 * 2048)
    assert model.flops_per_token(2048) == 6 * (counts["matrix"] + counts["head"]) + attention == 802_167_552


def test_roles_follow_nanochats_optimizer_split():
    model = tiny_nanochat(depth=3)
    roles = parameter_roles(model)
    by_role = {role: sorted(n for n, r in roles.items() if r == role) for role in set(roles.values())}
    assert by_role["embed"] == ["transformer.wte.weight", "value_embeds.0.weight", "value_embeds.2.weight"]
    assert by_role["head"] == ["lm_head.weight"]
    assert by_role["scalar"] == ["resid_lambdas", "x0_lambdas"]
    assert "transformer.h.2.attn.ve_gate.weight" in by_role["matrix"]
    assert all(n.startswith("transformer.h.") for n in by_role["matrix"])


# --------------------------------------------------------------------------- attention


def test_window_pattern_is_tiled_with_the_last_layer_full():
    assert window_sizes("SSSL", 12, 2048) == [1024, 1024, 1024, 2048] * 3
    assert window_sizes("SSSL", 6, 2048) == [1024, 1024, 1024, 2048, 1024, 2048]
    assert window_sizes("sl", 3, 64) == [32, 64, 64]
    assert window_sizes("L", 4, 64) == [64] * 4
    with pytest.raises(ValueError, match="model.window_pattern='SXL'"):
        window_sizes("SXL", 4, 64)


def dense_windowed_attention(q, k, v, window: int) -> torch.Tensor:
    """Attention written out in float64 with a mask built position by position."""
    seq_len = q.size(-2)
    allowed = torch.tensor([[0 <= qi - ki <= window for ki in range(seq_len)] for qi in range(seq_len)])
    scores = (q.double() @ k.double().mT) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.double()).float()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [0, 1, 7, 20, 39, 40, 1000])
def test_window_attention_equals_dense_attention_with_an_explicit_mask(backend, window):
    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # FlexAttention warns that it runs unfused (uncompiled) on CPU
        got = windowed_causal_attention(q, k, v, window, backend)
    torch.testing.assert_close(got, dense_windowed_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_value_embedding_enters_the_values_through_its_gate():
    torch.manual_seed(0)
    dim, heads, head_dim = 64, 2, 32
    attn = CausalSelfAttention(dim, heads, head_dim, value_embedding=True)
    torch.nn.init.normal_(attn.ve_gate.weight)
    with torch.no_grad():
        attn.c_proj.weight.copy_(torch.eye(dim))
    x, ve = torch.randn(1, 1, dim), torch.randn(1, 1, dim)
    cos, sin = rotary_tables(4, head_dim, 10000.0)
    # One position attends only to itself, so the output is its value: c_v(x) + 2·sigmoid(gate)·ve per head.
    got = attn(x, ve, cos[:, :1], sin[:, :1], window=4, backend="sdpa")
    gate = 2 * torch.sigmoid(x[..., :32] @ attn.ve_gate.weight.T)  # (1, 1, heads)
    expected = x @ attn.c_v.weight.T + gate.repeat_interleave(head_dim, dim=-1) * ve
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("depth", "layers"), [(4, ["1", "3"]), (5, ["0", "2", "4"]), (1, ["0"])])
def test_value_embeddings_sit_on_alternating_layers_ending_at_the_last(depth, layers):
    model = on_meta(depth=depth, vocab_size=1000)
    assert list(model.value_embeds) == layers
    assert [block.attn.ve_gate is not None for block in model.transformer.h] == [
        str(i) in layers for i in range(depth)
    ]
    assert (
        sum(p.numel() for p in model.value_embeds.parameters()) == len(layers) * 1024 * model.shape.model_dim
    )


def test_rope_rotates_the_two_halves_of_each_head_as_one_complex_number():
    head_dim, seq_len = 16, 10
    cos, sin = rotary_tables(seq_len, head_dim, 10000.0)
    x = torch.randn(1, seq_len, 2, head_dim)
    got = apply_rotary_emb(x, cos, sin)
    # Channel i pairs with i + head_dim/2 and turns by -t·10000^(-2i/head_dim) at position t.
    angles = torch.outer(
        torch.arange(seq_len).double(), 10000.0 ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    )
    z = torch.complex(x[..., : head_dim // 2].double(), x[..., head_dim // 2 :].double())
    turned = z * torch.polar(torch.ones_like(angles), -angles)[None, :, None, :]
    expected = torch.cat((turned.real, turned.imag), dim=-1).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # the tables are bf16, as nanochat's
    assert cos.dtype == torch.bfloat16


def test_vocabulary_is_padded_to_64_and_logits_are_sliced_back_and_capped():
    model = tiny_nanochat()
    assert model.lm_head.weight.shape[0] == model.transformer.wte.weight.shape[0] == 1024
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)  # logits of tens, so the cap shows
    captured = {}
    model.lm_head.register_forward_hook(lambda module, args, out: captured.setdefault("raw", out))
    tokens = torch.randint(0, 1000, (2, 16))
    logits = model.logits(tokens)
    assert logits.shape == (2, 16, 1000) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, 15.0 * torch.tanh(captured["raw"][..., :1000] / 15.0))
    assert logits.abs().max() < 15.0 < captured["raw"].abs().max()


def test_initialisation_is_nanochats():
    model = tiny_nanochat(depth=4, aspect_ratio=64, head_dim=64)  # width 256
    bound = 3**0.5 / 256**0.5
    block = model.transformer.h[1]
    for weight in (block.attn.c_q.weight, block.mlp.c_fc.weight, model.value_embeds["1"].weight):
        assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound
    assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert not block.attn.ve_gate.weight.any()
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert model.resid_lambdas.tolist() == [1.0] * 4
    assert model.x0_lambdas.tolist() == pytest.approx([0.1] * 4)
    # A near-zero head: the first loss is that of a uniform guess.
    tokens = torch.randint(0, 1000, (2, 33))
    assert model(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(math.log(1000), abs=0.01)


def test_mixed_precision_keeps_the_embeddings_in_bf16_and_the_rest_in_fp32():
    model = tiny_nanochat()
    model.cast_for_mixed_precision()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == {
        "transformer.wte.weight",
        "value_embeds.1.weight",
    }
    tokens = torch.randint(0, 1000, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert math.isfinite(loss.item()) and model.transformer.wte.weight.grad.dtype == torch.bfloat16


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.attention='fast'"):
        NanochatGPT(**{**TINY, "attention": "fast"})
    with pytest.raises(ValueError, match="value-embedding gates"):
        NanochatGPT(**{**TINY, "aspect_ratio": 8, "head_dim": 16})


# --------------------------------------------------------------------------- nanochat's optimizer


def test_polar_express_applies_its_polynomials_to_the_singular_values():
    g = torch.Generator().manual_seed(0)
    for shape in [(24, 10), (10, 24), (16, 16)]:
        G = torch.randn(*shape, generator=g, dtype=torch.float64)
        # Independently: scale, then map each singular value through the five polynomials.
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        s = S / (torch.linalg.norm(G) * 1.02 + 1e-6)
        for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
            s = a * s + b * s**3 + c * s**5
        torch.testing.assert_close(polar_express(G, dtype=torch.float64), U @ torch.diag(s) @ Vh)
        # In bf16 as trained: every singular value within the band the coefficients were tuned for.
        singular = torch.linalg.svdvals(polar_express(G.float()).double())
        assert singular.min() > 0.84 and singular.max() < 1.16, singular


def test_polar_express_coefficients_map_the_unit_interval_near_one():
    x = torch.linspace(1e-3, 1.0, 10_001, dtype=torch.float64)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        x = a * x + b * x**3 + c * x**5
    assert 0.85 < x.min() and x.max() < 1.15


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_variance_normalization_balances_rows_and_keeps_the_norm(shape):
    g = torch.Generator().manual_seed(1)
    first, second = (torch.randn(3, *shape, generator=g) for _ in range(2))
    tall = shape[0] >= shape[1]
    along = -1 if tall else -2  # rows of a tall matrix, columns of a wide one
    moment = torch.zeros(3, shape[0], 1) if tall else torch.zeros(3, 1, shape[1])
    out = normalize_variance(first, moment, beta2=0.95)
    # From a zero moment every row (column) is divided by the same multiple of its own RMS: equal norms.
    lengths = out.norm(dim=along)
    torch.testing.assert_close(lengths, lengths[:, :1].expand_as(lengths))
    torch.testing.assert_close(out.norm(dim=(-2, -1)), first.norm(dim=(-2, -1)))
    torch.testing.assert_close(moment, 0.05 * first.square().mean(dim=along, keepdim=True))
    # The next step: an EMA of mean squares, rows divided by its root, rescaled to the update's norm.
    expected_moment = 0.95 * moment + 0.05 * second.square().mean(dim=along, keepdim=True)
    scaled = second / expected_moment.sqrt()
    expected = scaled * (second.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True))
    torch.testing.assert_close(normalize_variance(second, moment, beta2=0.95), expected)
    torch.testing.assert_close(moment, expected_moment)


@pytest.mark.parametrize("cautious", [True, False])
def test_cautious_weight_decay_changes_only_where_update_and_weight_agree(cautious):
    g = torch.Generator().manual_seed(2)
    params, update = torch.randn(20, 20, generator=g), torch.randn(20, 20, generator=g)
    update[0, :5] = 0.0  # a zero update counts as agreeing (nanochat's >= 0)
    lr, wd = 0.1, 0.5
    got = params.clone()
    decayed_step(got, update, lr, wd, cautious=cautious)
    undecayed = params - lr * update
    for i in range(20):
        for j in range(20):
            p, u = params[i, j].item(), update[i, j].item()
            decays = (p * u >= 0) or not cautious
            want = undecayed[i, j] - lr * wd * p if decays else undecayed[i, j]
            assert got[i, j].item() == pytest.approx(want.item(), abs=1e-6)
    differs = (got - undecayed).abs() > 1e-7
    assert torch.equal(differs, (params * update >= 0) if cautious else torch.ones_like(differs))


def test_batch_lr_scale_is_the_square_root_of_the_batch_ratio():
    assert batch_lr_scale(2**19) == 1.0
    assert batch_lr_scale(2**17) == 0.5
    assert batch_lr_scale(2**21) == 2.0
    assert batch_lr_scale(1000) == pytest.approx(math.sqrt(1000 / 524288))


def test_learning_rates_and_weight_decay_follow_width_depth_and_batch():
    model = tiny_nanochat(depth=4, aspect_ratio=64, head_dim=64)  # width 256, depth 4
    opt = NanochatMuonAdamW(parameter_groups(model), depth=4, batch_tokens=2**17)
    batch, width = 0.5, (256 / 768) ** -0.5
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == pytest.approx(0.004 * width * batch)
    assert groups["embed"]["lr"] == pytest.approx(0.3 * width * batch)
    assert groups["scalar resid"]["lr"] == pytest.approx(0.5 * 0.01 * batch)
    assert groups["scalar x0"]["lr"] == pytest.approx(0.5 * batch)
    assert groups["scalar x0"]["betas"] == (0.96, 0.95) and groups["head"]["betas"] == (0.8, 0.95)
    assert [p is model.resid_lambdas for p in groups["scalar resid"]["params"]] == [True]
    muon = [g for name, g in groups.items() if name.startswith("matrix")]
    # One Muon group per shape: (256,256) q/k/v/proj, (1024,256) fc, (256,1024) proj, (4,32) gates.
    assert sorted(len(g["params"]) for g in muon) == [2, 4, 4, 16]
    assert all(g["lr"] == pytest.approx(0.02 * batch) for g in muon)
    assert all(g["weight_decay"] == pytest.approx(0.2 * (12 / 4) ** 2) for g in muon)


def test_muon_weight_decay_falls_linearly_to_zero_and_momentum_warms_up():
    g = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    opt = NanochatMuon([weight], lr=0.1, weight_decay=0.5, momentum_warmup_steps=4)
    opt.set_horizon(5)
    expected = weight.detach().clone()
    for step in range(5):
        weight.grad = torch.zeros_like(weight)  # no update: only the decay moves the weight
        assert opt.current_weight_decay(opt.param_groups[0]) == pytest.approx(0.5 * (1 - step / 5))
        opt.step()
        expected *= 1 - 0.1 * 0.5 * (1 - step / 5)
        torch.testing.assert_close(weight.detach(), expected)
    # momentum: linear from 0.85 to 0.95 over momentum_warmup_steps, then 0.95
    group = dict(opt.param_groups[0])
    assert [current_momentum({**group, "steps_taken": s}) for s in (0, 2, 4, 9)] == pytest.approx(
        [0.85, 0.90, 0.95, 0.95]
    )


def test_nanochat_muon_step_is_the_composition_of_its_parts():
    g = torch.Generator().manual_seed(4)
    weights = [torch.nn.Parameter(torch.randn(12, 6, generator=g)) for _ in range(2)]
    grads = [[torch.randn(12, 6, generator=g) for _ in weights] for _ in range(2)]
    opt = NanochatMuon(weights, lr=0.05, momentum=0.9, momentum_warmup_steps=0, weight_decay=0.1)
    params = torch.stack([w.detach().clone() for w in weights])
    buffer, moment = torch.zeros(2, 12, 6), torch.zeros(2, 12, 1)
    for step_grads in grads:
        for w, grad in zip(weights, step_grads, strict=True):
            w.grad = grad.clone()
        opt.step()
        stacked = torch.stack(step_grads)
        buffer = 0.9 * buffer + 0.1 * stacked
        update = normalize_variance(polar_express(0.1 * stacked + 0.9 * buffer), moment, 0.95)
        decayed_step(params, update, 0.05 * (12 / 6) ** 0.5, 0.1, cautious=True)
    torch.testing.assert_close(torch.stack([w.detach() for w in weights]), params, atol=1e-5, rtol=1e-4)


def _nanochat_muon_problem():
    g = torch.Generator().manual_seed(5)
    shapes = [(16, 8)] * 3 + [(8, 16), (12, 12)]  # an odd stack, shared unevenly over two ranks
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    return params, grads


def _make_nanochat_muon(params) -> NanochatMuon:
    opt = NanochatMuon(params, lr=0.05, weight_decay=0.2)
    opt.set_horizon(10)
    return opt


@pytest.mark.slow  # two fresh processes importing torch: several seconds
def test_two_rank_nanochat_muon_matches_one_rank(tmp_path):
    results = on_two_ranks(_nanochat_muon_problem, _make_nanochat_muon, tmp_path)
    params, grads = _nanochat_muon_problem()
    single = run_steps(_make_nanochat_muon, params, grads).state_dict()
    for got0, got1, want in zip(results[0]["params"], results[1]["params"], params, strict=True):
        assert torch.equal(got0, got1)  # every rank ends with the same weights...
        torch.testing.assert_close(got0, want.detach(), atol=1e-6, rtol=1e-5)  # ...those of one rank
    states = [result["state"]["state"] for result in results]
    for index, state in single["state"].items():
        for key in ("momentum_buffer", "second_moment"):
            assert torch.equal(states[0][index][key], states[1][index][key])
            torch.testing.assert_close(states[0][index][key], state[key])


def test_optimizer_state_resumes_the_same_trajectory():
    def run(model, opt, steps):
        for step in range(steps):
            tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(step))
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()

    model = tiny_nanochat()
    opt = NanochatMuonAdamW(parameter_groups(model), depth=2, batch_tokens=2**19)
    opt.set_horizon(6)
    run(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, 3)
    resumed = tiny_nanochat(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = NanochatMuonAdamW(parameter_groups(resumed), depth=2, batch_tokens=2**19)
    resumed_opt.set_horizon(6)
    resumed_opt.load_state_dict(saved_opt)
    run(resumed, resumed_opt, 3)
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_the_scalar_tags_survive_moving_the_model():
    model = tiny_nanochat().to(torch.float64)
    groups = {g["name"]: g for g in NanochatMuonAdamW(parameter_groups(model)).param_groups}
    assert groups["scalar resid"]["params"][0] is model.resid_lambdas
    assert groups["scalar x0"]["params"][0] is model.x0_lambdas


# --------------------------------------------------------------------------- muon_adam's Muon options


def _muon_run(**options) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    weight = torch.nn.Parameter(torch.randn(16, 8, generator=g))
    grads = [torch.randn(16, 8, generator=g) for _ in range(2)]
    start = weight.detach().clone()
    opt = Muon([weight], lr=0.05, momentum=0.9, **options)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
    return start, weight.detach(), grads


def test_muon_without_nesterov_orthogonalizes_the_momentum_buffer():
    start, got, (g1, g2) = _muon_run(nesterov=False)
    scale = 2**0.5  # sqrt(rows / cols) for a 16 x 8 matrix
    expected = start.clone()
    for buffer in (g1, 0.9 * g1 + g2):
        # Muon scales the bf16 orthogonalized update before casting it.
        expected -= 0.05 * (zeropower_via_newtonschulz5(buffer) * scale).float()
    torch.testing.assert_close(got, expected)
    _, with_nesterov, _ = _muon_run()
    assert not torch.allclose(got, with_nesterov)


@pytest.mark.parametrize("cautious", [False, True])
def test_muon_weight_decay_is_decoupled_and_optionally_cautious(cautious):
    g = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(16, 8, generator=g))
    grad = torch.randn(16, 8, generator=g)
    plain, decayed = weight.detach().clone(), weight.detach().clone()
    for target, decay in ((plain, 0.0), (decayed, 0.3)):
        p = torch.nn.Parameter(weight.detach().clone())
        p.grad = grad.clone()
        Muon([p], lr=0.05, momentum=0.9, weight_decay=decay, cautious_weight_decay=cautious).step()
        target.copy_(p.detach())
    # The same orthogonalized update, plus lr·wd·weight (where the update agrees in sign, if cautious).
    update = weight.detach() - plain  # = lr·update, whose sign is the update's
    mask = (update * weight.detach() >= 0) if cautious else torch.ones_like(update, dtype=torch.bool)
    torch.testing.assert_close(decayed, plain - 0.05 * 0.3 * weight.detach() * mask)


def test_muon_adam_passes_the_options_to_muon_and_defaults_to_the_reference():
    torch.manual_seed(0)
    model = GPT(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
    keys = ("nesterov", "weight_decay", "cautious_weight_decay")
    default = MuonAdam(parameter_groups(model)).optimizers["matrix"].param_groups[0]
    assert [default[k] for k in keys] == [True, 0.0, False]
    muon = MuonAdam(parameter_groups(model), nesterov=False, weight_decay=0.1, cautious_weight_decay=True)
    assert [muon.optimizers["matrix"].param_groups[0][k] for k in keys] == [False, 0.1, True]


# --------------------------------------------------------------------------- the preset, end to end


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speedrun.train", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_cfg_job_shows_the_presets_resolved_settings():
    proc = _cli("experiment=nanochat_d12", "--cfg", "job", "--resolve", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for line in (
        "_target_: speedrun.models.nanochat.NanochatGPT",
        "depth: 12",  # the model's, and the optimizer's (from the model)
        "sequence_len: 2048",  # from data.seq_len
        "batch_tokens: 524288",  # from trainer.train_batch_tokens
        "target_param_data_ratio: 10.5",
        "warmdown_ratio: 0.5",
        "weight_decay: 0.2",
    ):
        assert line in proc.stdout, line
    assert proc.stdout.count("depth: 12") == 2
    deeper = _cli("experiment=nanochat_d12", "model.depth=20", "--cfg", "job", "--resolve", timeout=60)
    assert deeper.stdout.count("depth: 20") == 2


def test_the_preset_trains_through_the_cli(tmp_path, corpus):
    run_dir = tmp_path / "run"
    proc = _cli(
        "experiment=nanochat_d12", "data=stdlib", "model.vocab_size=1024", "model.depth=2",
        "model.aspect_ratio=32", "model.head_dim=64", "data.seq_len=64", "data.val_tokens=8192",
        "trainer.train_batch_tokens=1024", "trainer.micro_batch_tokens=1024", "trainer.val_batch_tokens=4096",
        "trainer.target_param_data_ratio=0.2", "trainer.val_every=8", "trainer.log_every=8", "logger=none",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "nanochat: depth 2 -> model_dim 64" in log
    # The horizon counts the scaling parameters: 2 blocks of 12·64² + one 32 x 1 gate, and a 1024 x 64 head.
    scaling = 2 * 12 * 64 * 64 + 32 + 1024 * 64
    assert f"max_steps:{int(0.2 * scaling) // 1024}" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == int(0.2 * scaling) // 1024
    val = [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r]
    assert len(val) >= 3 and val[-1] < val[0] - 0.3


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels need CUDA")
def test_compiled_flex_attention_matches_the_masked_path_on_cuda():
    torch.manual_seed(0)
    model = NanochatGPT(**{**TINY, "sequence_len": 256, "attention": "flex"}).cuda()
    for block in model.transformer.h:  # zero-initialised projections would hide the attention's output
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
    tokens = torch.randint(0, 1000, (2, 257), device="cuda")
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    flex_loss = compiled(tokens[:, :-1], tokens[:, 1:])
    flex_loss.backward()
    flex_grad = model.transformer.h[0].attn.c_q.weight.grad.clone()
    model.zero_grad()
    model.attention = "sdpa"
    sdpa_loss = model(tokens[:, :-1], tokens[:, 1:])
    sdpa_loss.backward()
    torch.testing.assert_close(flex_loss, sdpa_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex_grad, model.transformer.h[0].attn.c_q.weight.grad, atol=1e-4, rtol=1e-3)
