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
        (dict(logit_softcap=0.0), "model.logit_softcap"),
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


def test_attention_matches_a_naive_implementation():
    # Independent spelling of the reference's attention: explicit softmax, repeated kv heads,
    # RoPE rotating the two halves of each head.
    attn = tiny_gpt(randomize=True).blocks[0].attn
    x = torch.randn(2, 12, 64)
    n, nkv, hd, t = 4, 2, 16, 12
    q = F.rms_norm(attn.c_q(x).view(2, t, n, hd).transpose(1, 2), (hd,))
    k = F.rms_norm(attn.c_k(x).view(2, t, nkv, hd).transpose(1, 2), (hd,))
    v = attn.c_v(x).view(2, t, nkv, hd).transpose(1, 2)
    pos = torch.arange(t, dtype=torch.float32)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = pos * inv_freq

    def rope(z):
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return torch.cat((z1 * angle.cos() + z2 * angle.sin(), z2 * angle.cos() - z1 * angle.sin()), dim=-1)

    q = rope(q) * attn.q_gain[None, :, None, None]
    k, v = rope(k).repeat_interleave(n // nkv, dim=1), v.repeat_interleave(n // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, t, 64)
    torch.testing.assert_close(attn(x), attn.proj(y), atol=1e-5, rtol=1e-4)


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
