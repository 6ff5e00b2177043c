"""parameter-golf's GPT: the model of the "Training Opt Seq4096 v1" record, math unchanged.

A pre-norm transformer with grouped-query attention (SDPA, causal) and RoPE, plus the record's tricks,
each a constructor switch (`model.<key>`) whose default is the record's, so that an ablation turns
one off and nothing else changes:
- `qk_norm`: q and k are RMS-normed before RoPE,
- `q_gain`: a learned per-head gain on q (the attention temperature; initial value `qk_gain_init`),
- `mlp_activation`: ReLU² (`relu2`), or `gelu`, or `swiglu`,
- `unet_skips`: the first half of the blocks stores its outputs, the second half adds them back
  (last in, first out) with learned per-channel weights,
- `x0_mix`: every block first blends its input with the normalized embedding, with learned weights,
- `zero_init_projections`: output projections start at zero, so every block starts as the identity,
- `logit_softcap`: a tanh soft cap on the logits (0: none),
- `tie_embeddings`: the head is the token embedding.
A switch that is off leaves its parameters out (not unused), so parameter counts and the optimizer's
groups show exactly what the ablation removed.

Modules are built in the reference's order so that the same seed draws the same initial weights,
and parameter names are the reference's: optimizer grouping and export select tensors by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.models.kv_cache import KVCache, LayerKV

# Small per-channel "control" tensors, found by name (the default of `model.control_patterns`). With
# the blocks' vectors they have the `scalar` role (speedrun/models/protocol.py): the scalar Adam group
# rather than Muon, fp32 in mixed-precision training, and stored unquantized in the int8 export.
CONTROL_TENSOR_NAME_PATTERNS: tuple[str, ...] = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
)


MLP_ACTIVATIONS = ("relu2", "gelu", "swiglu")


def is_control_tensor(name: str, patterns: tuple[str, ...] = CONTROL_TENSOR_NAME_PATTERNS) -> bool:
    return any(pattern in name for pattern in patterns)


class RMSNorm(nn.Module):
    """Parameter-free RMS norm (the learned gains live in attn_scale / mlp_scale instead)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """A linear layer whose weight stays fp32 (for the optimizer) and is cast to the input's dtype
    at matmul time (for bf16 compute)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Rotary(nn.Module):
    """RoPE cos/sin tables, cached for the last sequence length seen.

    The cache lives in non-persistent buffers: they follow the module across devices, are copied by
    deepcopy, stay out of the state dict, and torch.compile treats the refresh as an ordinary
    module-attribute mutation (one recompile when the length changes).
    Positions are computed in inv_freq's dtype, which follows the model's: after
    `GPT.cast_for_mixed_precision` that is bf16, exactly as in the reference.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", torch.empty(1, 1, 0, dim // 2), persistent=False)
        self.register_buffer("sin_cached", torch.empty(1, 1, 0, dim // 2), persistent=False)

    def reset_cache(self) -> None:
        """Forget the tables, so the next forward recomputes them from inv_freq as it is now."""
        self.cos_cached = self.cos_cached.new_empty(1, 1, 0, self.cos_cached.size(-1))
        self.sin_cached = self.sin_cached.new_empty(1, 1, 0, self.sin_cached.size(-1))

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.cos_cached.size(2) != seq_len:
            positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
            freqs = torch.outer(positions, self.inv_freq)
            self.cos_cached = freqs.cos()[None, None, :, :]
            self.sin_cached = freqs.sin()[None, None, :, :]
        return self.cos_cached.to(dtype=dtype), self.sin_cached.to(dtype=dtype)

    def at(self, start: int, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The tables of positions start .. start+length-1 (generation), equal to those rows of
        `forward`'s tables. Computed afresh rather than cached: the cached tables stay those of the
        training length, so sampling never makes a compiled training step see a changed buffer."""
        positions = torch.arange(
            start, start + length, device=self.inv_freq.device, dtype=self.inv_freq.dtype
        )
        freqs = torch.outer(positions, self.inv_freq)
        return freqs.cos()[None, None, :, :].to(dtype=dtype), freqs.sin()[None, None, :, :].to(dtype=dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        rope_base: float,
        qk_gain_init: float,
        qk_norm: bool = True,
        q_gain: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        # With q and k RMS-normed, the attention temperature is learned here, per head. Without it the
        # scores keep SDPA's fixed 1/sqrt(head_dim) scale.
        self.q_gain = (
            nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32)) if q_gain else None
        )
        self.rotary = Rotary(self.head_dim, base=rope_base)

    def forward(self, x: Tensor, kv: LayerKV | None = None) -> Tensor:
        """Causal attention over x; with `kv`, x holds new positions that also attend to the cached ones."""
        bsz, seqlen, dim = x.shape
        q = self.c_q(x).reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q = F.rms_norm(q, (q.size(-1),))
            k = F.rms_norm(k, (k.size(-1),))
        cos, sin = (
            self.rotary(seqlen, q.dtype) if kv is None else self.rotary.at(kv.position, seqlen, q.dtype)
        )
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        if self.q_gain is not None:
            q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
            )
        else:
            y = self._attend_with_cache(q, k, v, kv)
        y = y.transpose(1, 2).contiguous().reshape(bsz, seqlen, dim)
        return self.proj(y)

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV) -> Tensor:
        """Attention of the new positions' queries over the cached keys and values plus their own."""
        start = kv.position
        k, v = kv.update(k, v)
        if start == 0:  # nothing cached before: plain causal attention (the prompt)
            mask, causal = None, True
        elif q.size(2) == 1:  # one new token sees every position
            mask, causal = None, False
        else:  # several new tokens after cached ones: causal, offset by what the cache holds
            key_positions = torch.arange(k.size(2), device=q.device)
            query_positions = torch.arange(start, start + q.size(2), device=q.device)
            mask, causal = key_positions[None, :] <= query_positions[:, None], False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.num_kv_heads != self.num_heads
        )


def swiglu_hidden_size(dim: int, mlp_mult: int) -> int:
    """SwiGLU's hidden width: it has three matrices where ReLU² has two, so it takes 2/3 of ReLU²'s
    mlp_mult * dim (the convention of Shazeer's "GLU Variants Improve Transformer" and LLaMA), which
    keeps parameters and FLOPs equal; rounded to a multiple of 8 so bf16 matmuls stay aligned."""
    return 8 * max(1, round(2 * mlp_mult * dim / 3 / 8))


class MLP(nn.Module):
    """The feed-forward block: ReLU² (from modded-nanogpt, the record's), exact GELU, or SwiGLU
    (`proj(silu(gate(x)) * fc(x))`, narrower: see swiglu_hidden_size)."""

    def __init__(self, dim: int, mlp_mult: int, activation: str = "relu2"):
        super().__init__()
        self.activation = activation
        hidden = swiglu_hidden_size(dim, mlp_mult) if activation == "swiglu" else mlp_mult * dim
        self.fc = CastedLinear(dim, hidden, bias=False)
        self.gate = CastedLinear(dim, hidden, bias=False) if activation == "swiglu" else None
        self.proj = CastedLinear(hidden, dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.activation == "relu2":
            h = torch.relu(h).square()
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.silu(self.gate(x)) * h
        return self.proj(h)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        mlp_mult: int,
        rope_base: float,
        qk_gain_init: float,
        qk_norm: bool = True,
        q_gain: bool = True,
        mlp_activation: str = "relu2",
        x0_mix: bool = True,
    ):
        super().__init__()
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(
            dim, num_heads, num_kv_heads, rope_base, qk_gain_init, qk_norm, q_gain
        )
        self.mlp = MLP(dim, mlp_mult, mlp_activation)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Row 0 weighs the running residual, row 1 the block-0 input x0; starts as "x only".
        self.resid_mix = (
            nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float()) if x0_mix else None
        )

    def forward(self, x: Tensor, x0: Tensor, kv: LayerKV | None = None) -> Tensor:
        if self.resid_mix is not None:
            mix = self.resid_mix.to(dtype=x.dtype)
            x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        attn_out = self.attn(self.attn_norm(x), kv)
        x = x + self.attn_scale.to(dtype=x.dtype)[None, None, :] * attn_out
        x = x + self.mlp_scale.to(dtype=x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int = 1024,
        num_layers: int = 9,
        model_dim: int = 512,
        num_heads: int = 8,
        num_kv_heads: int = 4,
        mlp_mult: int = 2,
        tie_embeddings: bool = True,
        tied_embed_init_std: float = 0.005,
        logit_softcap: float = 30.0,
        rope_base: float = 10000.0,
        qk_gain_init: float = 1.5,
        unet_skips: bool = True,
        x0_mix: bool = True,
        q_gain: bool = True,
        qk_norm: bool = True,
        zero_init_projections: bool = True,
        mlp_activation: str = "relu2",
        control_patterns: tuple[str, ...] = CONTROL_TENSOR_NAME_PATTERNS,
    ):
        super().__init__()
        _check_config(num_layers, model_dim, num_heads, num_kv_heads, logit_softcap, mlp_activation)
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = model_dim // num_heads
        self.tie_embeddings = tie_embeddings
        self.tied_embed_init_std = tied_embed_init_std
        self.logit_softcap = logit_softcap
        self.zero_init_projections = zero_init_projections
        self.control_patterns = tuple(control_patterns)
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        self.num_skip_weights = min(self.num_encoder_layers, self.num_decoder_layers) if unet_skips else 0
        self.skip_weights = (
            nn.Parameter(torch.ones(self.num_skip_weights, model_dim, dtype=torch.float32))
            if unet_skips
            else None
        )
        block_switches = dict(qk_norm=qk_norm, q_gain=q_gain, mlp_activation=mlp_activation, x0_mix=x0_mix)
        self.blocks = nn.ModuleList(
            [
                Block(model_dim, num_heads, num_kv_heads, mlp_mult, rope_base, qk_gain_init, **block_switches)
                for _ in range(num_layers)
            ]
        )
        self.final_norm = RMSNorm()
        self.lm_head = None if tie_embeddings else CastedLinear(model_dim, vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        self._init_weights()

    def _init_weights(self) -> None:
        # A tied embedding doubles as the output head, so it starts small; an untied one keeps
        # nn.Embedding's N(0, 1). CastedLinear keeps nn.Linear's default unless it is an output
        # projection (marked _zero_init) and zero_init_projections is on. Zeroing happens after every
        # layer drew its default weights, so the switch changes no other tensor's initial values.
        if self.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.tied_embed_init_std)
        if not self.zero_init_projections:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def logits(self, input_ids: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Logits, soft-capped unless logit_softcap is 0, shape (batch, seq, vocab).

        With `kv_cache` (from `new_kv_cache`), input_ids continue the positions the cache holds and are
        added to it (speedrun/models/protocol.py). Every other operation acts on each position alone
        (norms, MLPs, mixes, skips, head), so only attention needs the cache.
        """
        x = self.tok_emb(input_ids)
        x = F.rms_norm(x, (x.size(-1),))
        x0 = x
        skips: list[Tensor] = []
        # First half stores skips; second half reuses them in reverse order. Without U-net skips nothing
        # is stored, and this is a plain residual stack.
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0, None if kv_cache is None else kv_cache.layer(i))
            if self.skip_weights is not None:
                skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(dtype=x.dtype)[None, None, :] * skips.pop()
            layer = self.num_encoder_layers + i
            x = self.blocks[layer](x, x0, None if kv_cache is None else kv_cache.layer(layer))
        if kv_cache is not None:
            kv_cache.advance(input_ids.size(1))
        bsz, seqlen, dim = x.shape
        x = self.final_norm(x).reshape(-1, dim)
        if self.lm_head is None:
            logits = F.linear(x, self.tok_emb.weight)
        else:
            logits = self.lm_head(x)
        if self.logit_softcap > 0:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits.reshape(bsz, seqlen, -1)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (fp32 scalar)."""
        logits = self.logits(input_ids)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), target_ids.reshape(-1), reduction="mean"
        )

    def new_kv_cache(self, max_len: int) -> KVCache:
        """An empty key/value cache for generating up to `max_len` positions (prompt included)."""
        return KVCache(self.num_layers, max_len)

    def parameter_roles(self) -> dict[str, str]:
        """The reference's optimizer split (see speedrun/models/protocol.py), in its order: the token
        embedding (also the head when tied), an untied head, the blocks' matrices (Muon), then the
        blocks' vectors and control tensors (names matching `control_patterns`) followed by the skip
        weights (scalar Adam)."""
        roles = {"tok_emb.weight": "embed"}
        if self.lm_head is not None:
            roles["lm_head.weight"] = "head"
        block_params = [(f"blocks.{name}", p) for name, p in self.blocks.named_parameters()]
        for name, p in block_params:
            if p.ndim == 2 and not is_control_tensor(name, self.control_patterns):
                roles[name] = "matrix"
        for name, p in block_params:
            if p.ndim < 2 or is_control_tensor(name, self.control_patterns):
                roles[name] = "scalar"
        # With a single layer there is nothing to skip over; the reference leaves the empty tensor out.
        if self.skip_weights is not None and self.skip_weights.numel() > 0:
            roles["skip_weights"] = "scalar"
        return roles

    def cast_for_mixed_precision(self) -> GPT:
        """The reference's precision recipe for bf16-autocast training; returns self.

        1. `.bfloat16()` everything: the token embedding (and so the tied head) is trained in bf16,
           as are its Adam moments, and RoPE's inv_freq (a buffer) becomes bf16, so positions are
           bf16-rounded above 256, as in the reference.
        2. CastedLinear weights back to fp32: Muon's updates and momentum need the precision;
           the layers cast to bf16 at matmul time anyway.
        3. The `scalar` role (vectors and control tensors) back to fp32: they are tiny and multiply the
           residual stream directly, so bf16 rounding of their updates would stall them.
        Call it before the first forward: RoPE tables are recomputed from the cast inv_freq.
        """
        self.bfloat16()
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.float()
            if isinstance(module, Rotary):
                module.reset_cache()
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, role in self.parameter_roles().items():
                if role == "scalar":
                    params[name].data = params[name].data.float()
        return self

    def matmul_params(self) -> int:
        """Weights that take part in a matmul: every linear layer, plus the embedding when it is
        also the output head (a lookup alone costs no FLOPs)."""
        count = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        if self.tie_embeddings:
            count += self.tok_emb.weight.numel()
        return count

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, nanochat's convention: 6 per matmul weight (2 forward, 4
        backward) plus 12·layers·heads·head_dim·seq_len for the attention scores and values
        (counted as if non-causal). Vector parameters and embedding lookups are not counted."""
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(6 * self.matmul_params() + attention)


def _check_config(
    num_layers: int,
    model_dim: int,
    num_heads: int,
    num_kv_heads: int,
    logit_softcap: float,
    mlp_activation: str,
) -> None:
    if num_layers < 1:
        raise ValueError(f"model.num_layers={num_layers}: need at least 1 layer")
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(
            f"model.num_heads={num_heads}, model.num_kv_heads={num_kv_heads}: both must be at least 1"
        )
    if model_dim % num_heads != 0:
        raise ValueError(
            f"model.model_dim={model_dim} is not divisible by model.num_heads={num_heads}; "
            f"pick a multiple of 2*num_heads (e.g. {2 * num_heads * max(1, round(model_dim / (2 * num_heads)))})"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"model.num_heads={num_heads} is not divisible by model.num_kv_heads={num_kv_heads}; "
            "pick num_kv_heads among the divisors of num_heads"
        )
    head_dim = model_dim // num_heads
    if head_dim % 2 != 0:
        raise ValueError(
            f"head_dim = model.model_dim / model.num_heads = {head_dim} is odd, but RoPE rotates pairs; "
            "change model_dim or num_heads so that model_dim / num_heads is even"
        )
    if logit_softcap < 0.0:
        raise ValueError(f"model.logit_softcap={logit_softcap} must be positive, or 0 for no soft cap")
    if mlp_activation not in MLP_ACTIVATIONS:
        raise ValueError(
            f"model.mlp_activation={mlp_activation!r} is not one of {', '.join(MLP_ACTIVATIONS)}; pick one of those"
        )
