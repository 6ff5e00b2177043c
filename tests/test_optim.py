from __future__ import annotations

import io

import pytest
import torch

from speedrun.models import GPT
from speedrun.models.protocol import parameter_groups
from speedrun.optim import AdamW, Muon, MuonAdam
from speedrun.optim.muon import current_momentum, zeropower_via_newtonschulz5
from tests.two_ranks import on_two_ranks, run_steps

TINY = dict(vocab_size=128, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(**{**TINY, **overrides})


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def build(factory, model: GPT, **kwargs):
    """An optimizer as the trainer builds it: from the model's parameter groups."""
    return factory(parameter_groups(model), **kwargs)


def train(model: GPT, optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        loss = model(*batch(seed=step % 2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- grouping


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_every_parameter_is_in_exactly_one_group(tie_embeddings):
    model = tiny_gpt(tie_embeddings=tie_embeddings)
    groups = {g["name"]: g["params"] for g in parameter_groups(model)}
    all_grouped = [p for params in groups.values() for p in params]
    assert sorted(id(p) for p in all_grouped) == sorted(id(p) for p in model.parameters())
    names = {id(p): name for name, p in model.named_parameters()}
    assert [names[id(p)] for p in groups["embed"]] == ["tok_emb.weight"]
    assert [names[id(p)] for p in groups.get("head", [])] == ([] if tie_embeddings else ["lm_head.weight"])
    assert {names[id(p)].split(".", 2)[2] for p in groups["matrix"]} == {
        "attn.c_q.weight",
        "attn.c_k.weight",
        "attn.c_v.weight",
        "attn.proj.weight",
        "mlp.fc.weight",
        "mlp.proj.weight",
    }
    scalar_names = {names[id(p)] for p in groups["scalar"]}
    assert "skip_weights" in scalar_names and "blocks.0.resid_mix" in scalar_names  # 2-D but control
    assert "blocks.2.attn.q_gain" in scalar_names


def test_single_layer_model_has_no_skip_weights_to_optimize():
    model = tiny_gpt(num_layers=1)
    scalar = next(g["params"] for g in parameter_groups(model) if g["name"] == "scalar")
    assert all(p is not model.skip_weights for p in scalar)
    build(MuonAdam, model)  # builds without an empty-parameter error


@pytest.mark.parametrize("factory", [MuonAdam, AdamW])
def test_optimizers_cover_the_model_with_a_learning_rate_per_role(factory):
    model = tiny_gpt(tie_embeddings=False)
    opt = build(factory, model, matrix_lr=0.1, scalar_lr=0.2, untied_embed_lr=0.3, head_lr=0.4)
    optimized = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, optimized)) == sorted(map(id, model.parameters()))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "matrix": 0.1,
        "scalar": 0.2,
        "embed": 0.3,
        "head": 0.4,
    }


# --------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (40, 40)])
def test_newton_schulz_output_is_near_orthogonal(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == shape and X.dtype == torch.bfloat16
    singular_values = torch.linalg.svdvals(X.float())
    # The quintic trades exact convergence for speed: values land around [0.7, 1.2].
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    # The input's were spread over an order of magnitude.
    assert torch.linalg.svdvals(G / G.norm()).max() < 0.5


def test_muon_first_step_is_the_scaled_orthogonalized_nesterov_gradient():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(48, 16))
    grad = torch.randn(48, 16)
    tall.grad = grad.clone()
    before = tall.detach().clone()
    Muon([tall], lr=0.1, momentum=0.9).step()
    # momentum buffer = g, nesterov gives g + 0.9 g; tall matrices are scaled by sqrt(rows / cols)
    expected_update = zeropower_via_newtonschulz5(1.9 * grad).float() * (48 / 16) ** 0.5
    expected = before - 0.1 * expected_update.bfloat16().float()
    torch.testing.assert_close(tall.detach(), expected, atol=1e-6, rtol=0)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(4))], lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    "warmup_steps, step, expected",
    [(500, 0, 0.85), (500, 250, 0.90), (500, 500, 0.95), (500, 9000, 0.95), (0, 0, 0.95)],
)
def test_muon_momentum_warms_up_linearly(warmup_steps, step, expected):
    opt = build(
        MuonAdam, tiny_gpt(), momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_steps=warmup_steps
    )
    group = opt.optimizers["matrix"].param_groups[0]
    group["steps_taken"] = step
    assert current_momentum(group) == pytest.approx(expected)


def test_muon_counts_its_steps_in_its_saved_state():
    model = tiny_gpt()
    opt = build(MuonAdam, model)
    train(model, opt, steps=3)
    saved = opt.state_dict()["matrix"]["param_groups"][0]
    assert saved["steps_taken"] == 3


# --------------------------------------------------------------------------- the optimizer sets


@pytest.mark.parametrize("factory", [MuonAdam, AdamW])
def test_a_few_steps_reduce_the_loss(factory):
    model = tiny_gpt()
    lrs = dict(matrix_lr=0.04, scalar_lr=0.04, embed_lr=0.05) if factory is MuonAdam else {}
    losses = train(model, build(factory, model, **lrs), steps=8)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("factory", [MuonAdam, AdamW])
def test_state_dict_round_trip_continues_bit_identically(factory):
    model = tiny_gpt(tie_embeddings=False)
    opt = build(factory, model)
    train(model, opt, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = tiny_gpt(seed=99, tie_embeddings=False)
    resumed.load_state_dict(saved["model"])
    resumed_opt = build(factory, resumed)
    resumed_opt.load_state_dict(saved["optimizer"])
    assert train(model, opt, steps=2, start=3) == train(resumed, resumed_opt, steps=2, start=3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_loading_state_of_another_layout_names_the_mismatch():
    tied_state = build(MuonAdam, tiny_gpt()).state_dict()
    with pytest.raises(ValueError, match="tie_embeddings"):
        build(MuonAdam, tiny_gpt(tie_embeddings=False)).load_state_dict(tied_state)


def test_grad_clipping_bounds_the_global_norm():
    model = tiny_gpt()
    opt = build(MuonAdam, model, grad_clip_norm=0.01)
    (model(*batch()) * 100).backward()
    opt.step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm <= 0.01 * 1.0001


def test_adamw_decays_matrices_only():
    model = tiny_gpt()
    opt = build(AdamW, model, weight_decay=0.1)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"embed": 0.0, "matrix": 0.1, "scalar": 0.0}


# --------------------------------------------------------------------------- distributed Muon


def _muon_problem() -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(16, 8), (8, 16), (12, 12)]]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    return params, grads


def _make_muon(params) -> Muon:
    return Muon(params, lr=0.05, momentum=0.9)


@pytest.mark.slow  # two fresh processes importing torch: several seconds
def test_two_rank_muon_matches_one_rank(tmp_path):
    results = on_two_ranks(_muon_problem, _make_muon, tmp_path)
    params, grads = _muon_problem()
    single = run_steps(_make_muon, params, grads).state_dict()
    for result in results:
        for got, want in zip(result["params"], params, strict=True):
            assert torch.equal(got, want.detach())
        # Every rank holds every momentum buffer, so any rank's state resumes the run.
        for index, state in single["state"].items():
            assert torch.equal(result["state"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
