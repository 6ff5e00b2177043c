from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from speedrun.models import GPT
from speedrun.models.gpt import CONTROL_TENSOR_NAME_PATTERNS, CastedLinear, apply_rotary_emb

TINY = dict(vocab_size=128, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)


def tiny_gpt(seed: int = 0, randomize: bool = False, **overrides) -> GPT:
    """A tiny GPT; `randomize` replaces the zero/identity init so every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(**{**TINY, **overrides})
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
    return model


def batch(
    seed: int = 1, bsz: int = 2, seqlen: int = 16, vocab: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bsz, seqlen + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_reference_configuration_has_17_059_912_parameters():
    model = GPT()
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


def test_parameter_names_are_the_references():
    names = set(dict(tiny_gpt().named_parameters()))
    expected_block = {
        "attn.c_q.weight",
        "attn.c_k.weight",
        "attn.c_v.weight",
        "attn.proj.weight",
        "attn.q_gain",
        "mlp.fc.weight",
        "mlp.proj.weight",
        "attn_scale",
        "mlp_scale",
        "resid_mix",
    }
    expected = {"tok_emb.weight", "skip_weights"} | {
        f"blocks.{i}.{n}" for i in range(3) for n in expected_block
    }
    assert names == expected
    untied = set(dict(tiny_gpt(tie_embeddings=False).named_parameters()))
    assert untied == expected | {"lm_head.weight"}


def test_state_dict_holds_parameters_only():
    model = tiny_gpt()
    model(*batch())  # fills the RoPE caches
    assert set(model.state_dict()) == set(dict(model.named_parameters()))


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (dict(model_dim=60, num_heads=8), "model.model_dim=60"),
        (dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads=3"),
        (dict(model_dim=36, num_heads=4, num_kv_heads=2), "head_dim"),
        (dict(logit_softcap=-1.0), "model.logit_softcap"),
        (dict(mlp_activation="tanh"), "model.mlp_activation"),
    ],
)
def test_bad_shapes_are_refused_with_the_culprit_named(overrides, culprit):
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        GPT(**{**TINY, **overrides})


def test_initial_loss_is_uniform_over_the_vocabulary():
    # Zero-initialized output projections and a tiny tied embedding give near-zero logits.
    loss = tiny_gpt()(*batch())
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - math.log(128)) < 0.01


def test_forward_is_the_cross_entropy_of_logits():
    model = tiny_gpt(randomize=True)
    x, y = batch()
    logits = model.logits(x)
    assert logits.shape == (2, 16, 128)
    assert logits.abs().max() <= model.logit_softcap
    expected = F.cross_entropy(logits.reshape(-1, 128).float(), y.reshape(-1))
    assert torch.equal(model(x, y), expected)


def test_untied_head_starts_at_zero_and_tied_head_is_the_embedding():
    untied = tiny_gpt(tie_embeddings=False)
    assert untied.lm_head is not None and torch.count_nonzero(untied.lm_head.weight) == 0
    assert torch.count_nonzero(untied.logits(batch()[0])) == 0
    tied = tiny_gpt()
    assert tied.lm_head is None
    assert tied.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)


def test_same_seed_same_weights():
    a, b = tiny_gpt(seed=3), tiny_gpt(seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_attention_is_causal():
    model = tiny_gpt(randomize=True)
    x, _ = batch()
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 128
    before, after = model.logits(x), model.logits(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_qk_norm"])
@pytest.mark.parametrize("q_gain", [True, False], ids=["q_gain", "no_q_gain"])
def test_attention_matches_a_naive_implementation(qk_norm, q_gain):
    # Independent spelling of the reference's attention: explicit softmax, repeated kv heads,
    # RoPE rotating the two halves of each head; RMS norm written out, and no gain at all when off.
    attn = tiny_gpt(randomize=True, qk_norm=qk_norm, q_gain=q_gain).blocks[0].attn
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(5))
    n, nkv, hd, t = 4, 2, 16, 12

    def norm(z):
        return z / (z.square().mean(-1, keepdim=True) + torch.finfo(z.dtype).eps).sqrt() if qk_norm else z

    q = norm((x @ attn.c_q.weight.T).view(2, t, n, hd).transpose(1, 2))
    k = norm((x @ attn.c_k.weight.T).view(2, t, nkv, hd).transpose(1, 2))
    v = (x @ attn.c_v.weight.T).view(2, t, nkv, hd).transpose(1, 2)
    pos = torch.arange(t, dtype=torch.float32)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = pos * inv_freq

    def rope(z):
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return torch.cat((z1 * angle.cos() + z2 * angle.sin(), z2 * angle.cos() - z1 * angle.sin()), dim=-1)

    q = rope(q) * (attn.q_gain[None, :, None, None] if q_gain else 1.0)
    assert (attn.q_gain is not None) == q_gain
    k, v = rope(k).repeat_interleave(n // nkv, dim=1), v.repeat_interleave(n // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, t, 64)
    torch.testing.assert_close(attn(x), y @ attn.proj.weight.T, atol=1e-5, rtol=1e-4)


def test_rotary_cache_follows_sequence_length_and_survives_deepcopy():
    model = tiny_gpt(randomize=True)
    short, long = batch(seqlen=8), batch(seqlen=20)
    loss_short = model(*short)
    model(*long)
    assert model.blocks[0].attn.rotary.cos_cached.shape[2] == 20
    assert torch.equal(model(*short), loss_short)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(*long), model(*long))


def test_fullgraph_compile_matches_eager():
    model = tiny_gpt(randomize=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, y = batch()
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, model(x, y))
    assert all(p.grad is not None for p in model.parameters())


def test_cast_for_mixed_precision_follows_the_reference_recipe():
    model = tiny_gpt(randomize=True).cast_for_mixed_precision()
    for name, p in model.named_parameters():
        if name == "tok_emb.weight":
            assert p.dtype == torch.bfloat16, name  # the reference trains the tied embedding in bf16
        else:
            assert p.dtype == torch.float32, name
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, CastedLinear))
    rotary = model.blocks[0].attn.rotary
    assert rotary.inv_freq.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(*batch(seqlen=300))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Positions are bf16, as in the reference: 257 rounds to 256, so rows 256 and 257 coincide.
    assert torch.equal(rotary.cos_cached[0, 0, 256], rotary.cos_cached[0, 0, 257])


def test_control_patterns_cover_the_control_parameters():
    for name, p in tiny_gpt().named_parameters():
        is_control = any(pattern in name for pattern in CONTROL_TENSOR_NAME_PATTERNS)
        assert is_control == (p.ndim < 2 or name in ("skip_weights",) or "resid_mix" in name), name


def test_rotary_half_split_convention():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cos, sin = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    assert torch.equal(apply_rotary_emb(x, cos, sin), torch.tensor([[3.0, 2.0, -1.0, 4.0]]))


def test_flops_per_token_counts_matmul_weights_and_attention():
    model = GPT()
    per_block = 512 * 512 * 2 + 512 * 256 * 2 + 512 * 1024 * 2
    matmul = 9 * per_block + 1024 * 512  # the tied head is a matmul
    assert model.flops_per_token(4096) == 6 * matmul + 12 * 9 * 8 * 64 * 4096
    untied = GPT(tie_embeddings=False)
    assert untied.flops_per_token(1024) == 6 * matmul + 12 * 9 * 8 * 64 * 1024


# ------------------------------------------------------------------ the record's tricks as switches

LAYERS, DIM, HEADS, VOCAB = TINY["num_layers"], TINY["model_dim"], TINY["num_heads"], TINY["vocab_size"]
BLOCKS = range(LAYERS)

# Each switch turned off: the parameters it removes and adds, and the exact change in the count.
SWITCHES_OFF = {
    "unet_skips": (dict(unet_skips=False), {"skip_weights"}, set(), -(LAYERS // 2) * DIM),
    "x0_mix": (dict(x0_mix=False), {f"blocks.{i}.resid_mix" for i in BLOCKS}, set(), -LAYERS * 2 * DIM),
    "q_gain": (dict(q_gain=False), {f"blocks.{i}.attn.q_gain" for i in BLOCKS}, set(), -LAYERS * HEADS),
    "qk_norm": (dict(qk_norm=False), set(), set(), 0),
    "logit_softcap": (dict(logit_softcap=0.0), set(), set(), 0),
    "zero_init_projections": (dict(zero_init_projections=False), set(), set(), 0),
    "tie_embeddings": (dict(tie_embeddings=False), set(), {"lm_head.weight"}, VOCAB * DIM),
    "gelu": (dict(mlp_activation="gelu"), set(), set(), 0),
    # 2/3 of 2 x 64 = 85.3, rounded to a multiple of 8: 88 wide, three matrices instead of two of 128.
    "swiglu": (
        dict(mlp_activation="swiglu"),
        set(),
        {f"blocks.{i}.mlp.gate.weight" for i in BLOCKS},
        LAYERS * (3 * DIM * 88 - 2 * DIM * 128),
    ),
}
ON_VALUES = dict(
    unet_skips=True, x0_mix=True, q_gain=True, qk_norm=True, logit_softcap=30.0,
    zero_init_projections=True, tie_embeddings=True, mlp_activation="relu2",
    control_patterns=CONTROL_TENSOR_NAME_PATTERNS,
)  # fmt: skip


def n_params(model: GPT) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_switch_at_its_default_is_the_unswitched_model_bitwise():
    default, explicit = tiny_gpt(seed=4), tiny_gpt(seed=4, **ON_VALUES)
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert all(torch.equal(default.state_dict()[k], v) for k, v in explicit.state_dict().items())
    assert torch.equal(default(*batch()), explicit(*batch()))
    # The record's layout keeps its count with every switch spelled out.
    assert n_params(GPT(**ON_VALUES)) == 17_059_912


@pytest.mark.parametrize("switch", SWITCHES_OFF)
def test_a_switch_off_removes_and_adds_exactly_its_parameters(switch):
    overrides, removed, added, delta = SWITCHES_OFF[switch]
    on, off = tiny_gpt(), tiny_gpt(**overrides)
    on_names, off_names = set(dict(on.named_parameters())), set(dict(off.named_parameters()))
    assert on_names - off_names == removed and off_names - on_names == added
    assert n_params(off) - n_params(on) == delta
    # Every parameter that is left keeps its role (and, but for SwiGLU's narrower MLP, its shape).
    on_roles, off_roles = on.parameter_roles(), off.parameter_roles()
    assert all(off_roles[name] == on_roles[name] for name in on_names & off_names)
    if switch != "swiglu":
        assert all(off.get_parameter(n).shape == on.get_parameter(n).shape for n in on_names & off_names)


@pytest.mark.parametrize("switch", ["unet_skips", "x0_mix", "q_gain", "qk_norm", "logit_softcap", "gelu"])
def test_a_switch_off_leaves_every_other_initial_value_alone(switch):
    overrides, *_ = SWITCHES_OFF[switch]
    on, off = tiny_gpt(seed=7).state_dict(), tiny_gpt(seed=7, **overrides).state_dict()
    assert all(torch.equal(on[name], tensor) for name, tensor in off.items())


def test_no_zero_init_changes_only_the_output_projections():
    on, off = tiny_gpt(seed=7), tiny_gpt(seed=7, zero_init_projections=False)
    projections = {f"blocks.{i}.{part}.proj.weight" for i in BLOCKS for part in ("attn", "mlp")}
    for name, tensor in off.state_dict().items():
        if name not in projections:
            assert torch.equal(on.state_dict()[name], tensor), name
            continue
        assert torch.count_nonzero(on.state_dict()[name]) == 0, name
        # nn.Linear's default: uniform within 1/sqrt(fan_in), so std = bound / sqrt(3).
        bound = 1 / math.sqrt(tensor.shape[1])
        assert tensor.abs().max() <= bound and tensor.std().item() == pytest.approx(
            bound / math.sqrt(3), rel=0.1
        )
    untied = tiny_gpt(tie_embeddings=False, zero_init_projections=False)
    assert torch.count_nonzero(untied.lm_head.weight) == untied.lm_head.weight.numel()


# Switching a trick off is the same as the trick with its parameters at the identity: what is left of
# the model computes exactly what it did (bitwise), so the switch changes what it names and no more.
# Each entry sets the identity, given the model with the trick (on) and the one without (off).
IDENTITY = {
    "unet_skips": lambda on, off: on.skip_weights.zero_(),
    "x0_mix": lambda on, off: [b.resid_mix.copy_(torch.tensor([[1.0], [0.0]])) for b in on.blocks],
    "q_gain": lambda on, off: [b.attn.q_gain.fill_(1.0) for b in on.blocks],
    # An untied head holding the embedding's weights is the tied head.
    "tie_embeddings": lambda on, off: off.lm_head.weight.copy_(on.tok_emb.weight),
}


@pytest.mark.parametrize("switch", IDENTITY)
def test_a_switch_off_equals_its_trick_at_the_identity(switch):
    overrides, removed, added, _ = SWITCHES_OFF[switch]
    on, off = tiny_gpt(randomize=True), tiny_gpt(**overrides)
    state = {k: v for k, v in on.state_dict().items() if k not in removed}
    noise = torch.Generator().manual_seed(9)
    state.update({name: torch.randn(off.get_parameter(name).shape, generator=noise) for name in added})
    off.load_state_dict(state, strict=True)
    x, y = batch()
    assert not torch.equal(on.logits(x), off.logits(x))  # the trick, with learned values, does something
    with torch.no_grad():
        IDENTITY[switch](on, off)
    assert torch.equal(on.logits(x), off.logits(x))
    assert torch.equal(on(x, y), off(x, y))


def test_no_unet_skips_is_a_plain_residual_stack():
    model = tiny_gpt(randomize=True, unet_skips=False)
    x, _ = batch()
    h = F.rms_norm(model.tok_emb(x), (DIM,))
    x0 = h
    for block in model.blocks:
        h = block(h, x0)
    expected = F.linear(F.rms_norm(h, (DIM,)), model.tok_emb.weight)
    torch.testing.assert_close(model.logits(x), 30.0 * torch.tanh(expected / 30.0), atol=0, rtol=0)


def test_no_x0_mix_block_ignores_x0():
    block = tiny_gpt(randomize=True, x0_mix=False).blocks[1]
    x, x0 = torch.randn(2, 8, DIM), torch.randn(2, 8, DIM)
    assert torch.equal(block(x, x0), block(x, torch.zeros_like(x0)))
    h = x + block.attn_scale * block.attn(F.rms_norm(x, (DIM,)))
    torch.testing.assert_close(block(x, x0), h + block.mlp_scale * block.mlp(F.rms_norm(h, (DIM,))))


def test_no_softcap_logits_are_the_plain_projection():
    capped = tiny_gpt(randomize=True)
    with torch.no_grad():
        capped.tok_emb.weight.mul_(10.0)  # logits large enough for the cap to bite
    plain = tiny_gpt(logit_softcap=0.0)
    plain.load_state_dict(capped.state_dict())
    hidden = {}
    plain.final_norm.register_forward_hook(lambda module, args, out: hidden.update(out=out))
    x, _ = batch()
    logits = plain.logits(x)
    assert torch.equal(logits, F.linear(hidden["out"], plain.tok_emb.weight).reshape(logits.shape))
    assert logits.abs().max() > 30.0
    torch.testing.assert_close(capped.logits(x), 30.0 * torch.tanh(logits / 30.0))


@pytest.mark.parametrize("activation", ["relu2", "gelu", "swiglu"])
def test_mlp_activation_matches_its_formula(activation):
    mlp = tiny_gpt(randomize=True, mlp_activation=activation).blocks[0].mlp
    x = torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(2))
    up = x @ mlp.fc.weight.T
    if activation == "relu2":
        hidden = torch.where(up > 0, up, 0.0) ** 2
    elif activation == "gelu":  # exact GELU: x * Phi(x)
        hidden = up * 0.5 * (1.0 + torch.erf(up / math.sqrt(2.0)))
    else:  # SwiGLU: Swish_1(x W_gate) * (x W_up)
        gate = x @ mlp.gate.weight.T
        hidden = gate / (1.0 + torch.exp(-gate)) * up
        assert mlp.fc.weight.shape == mlp.gate.weight.shape == (88, DIM)
    torch.testing.assert_close(mlp(x), hidden @ mlp.proj.weight.T, atol=1e-5, rtol=1e-5)


def test_swiglu_keeps_the_record_layouts_parameter_count_within_half_a_percent():
    relu2, swiglu = n_params(GPT()), n_params(GPT(mlp_activation="swiglu"))
    # 2/3 of 1024 = 682.7 -> 680 wide: 9 x 512 x (3 x 680 - 2 x 1024) fewer weights.
    assert swiglu - relu2 == 9 * 512 * (3 * 680 - 2 * 1024)
    assert abs(swiglu - relu2) / relu2 < 0.005


# ------------------------------------------------------------------ control patterns


def test_control_patterns_choose_the_scalar_role_and_what_stays_fp32():
    from speedrun.export import quantize_state_dict
    from speedrun.models.protocol import parameter_groups
    from speedrun.optim import MuonAdam

    # c_q joins the control tensors; resid_mix leaves them.
    patterns = [p for p in CONTROL_TENSOR_NAME_PATTERNS if "resid_mix" not in p] + ["c_q"]
    default, custom = tiny_gpt(), tiny_gpt(control_patterns=patterns)
    roles = custom.parameter_roles()
    for i in BLOCKS:
        assert default.parameter_roles()[f"blocks.{i}.attn.c_q.weight"] == "matrix"
        assert roles[f"blocks.{i}.attn.c_q.weight"] == "scalar"
        assert roles[f"blocks.{i}.resid_mix"] == "matrix"
        assert roles[f"blocks.{i}.attn_scale"] == "scalar"  # vectors are scalar whatever the patterns
    # The optimizer: c_q in the scalar Adam, resid_mix in Muon.
    names = {id(p): n for n, p in custom.named_parameters()}
    optimizer = MuonAdam(parameter_groups(custom))
    scalar_adam = {names[id(p)] for p in optimizer.optimizers["scalar"].param_groups[0]["params"]}
    muon = {names[id(p)] for p in optimizer.optimizers["matrix"].param_groups[0]["params"]}
    assert "blocks.0.attn.c_q.weight" in scalar_adam and "blocks.0.resid_mix" in muon
    # The artifact: small float tensors are kept, the control ones in fp32 and the rest in fp16.
    artifact, _ = quantize_state_dict(custom.state_dict(), roles)
    kept = artifact["passthrough"]
    assert kept["blocks.0.attn.c_q.weight"].dtype == torch.float32
    assert kept["blocks.0.resid_mix"].dtype == torch.float16
    # Mixed precision: resid_mix is no longer a control tensor, so it trains in bf16.
    custom.cast_for_mixed_precision()
    assert custom.blocks[0].resid_mix.dtype == torch.bfloat16
    assert custom.blocks[0].attn.c_q.weight.dtype == torch.float32
