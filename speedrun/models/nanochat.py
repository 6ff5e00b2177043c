"""nanochat's GPT, as in karpathy/nanochat at commit 07c4dd4 (`nanochat/gpt.py`), math unchanged.

The whole shape follows one number, `depth` (nanochat's `--depth`):
- width = depth x aspect_ratio, rounded up to a multiple of head_dim; heads = width / head_dim, as
  many key/value heads as query heads (no grouped-query attention);
- a pre-norm transformer of `depth` blocks: parameter-free RMS norms, RoPE applied to q and k
  *before* their RMS norm, a ReLU² MLP of 4 x width, no biases;
- sliding-window attention: `window_pattern` ("SSSL") tiled over the layers, L = the full
  sequence, S = half of it; the last layer always sees the full sequence;
- value embeddings: alternating layers (the last one included) add a per-token embedding to the
  attention values, through a gate read from the first 32 channels of the block's input
  (2·sigmoid, so 1 at initialisation);
- per-layer scalars: every block's input is resid_lambdas[i]·x + x0_lambdas[i]·x0, where x0 is the
  normed token embedding;
- an untied head over a vocabulary padded to a multiple of 64 (for the matmul), its logits sliced
  back to the real vocabulary and soft-capped at 15 by tanh.

Parameter names are nanochat's (`transformer.wte`, `transformer.h.N.attn.c_q`, `lm_head`,
`value_embeds.N`, `resid_lambdas`, `x0_lambdas`), so its checkpoints load with `load_state_dict`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.models.gpt import apply_rotary_emb
from speedrun.optim.nanochat import SCALAR_KIND_ATTRIBUTE

log = logging.getLogger("speedrun")

# The value-embedding gate reads this many leading channels of the block's input (nanochat's constant).
VALUE_GATE_CHANNELS = 32


@dataclass(frozen=True)
class NanochatShape:
    """The shapes nanochat derives from its depth (scripts/base_train.py)."""

    depth: int
    base_dim: int  # depth x aspect_ratio, before rounding
    model_dim: int  # rounded up to a multiple of head_dim, so every head is exactly head_dim wide
    num_heads: int
    head_dim: int


def nanochat_shape(depth: int, aspect_ratio: int, head_dim: int) -> NanochatShape:
    """Width and heads for a depth: base = depth·aspect_ratio, nudged up to a multiple of head_dim."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"model.depth={depth}, model.aspect_ratio={aspect_ratio}, model.head_dim={head_dim}: depth and "
            "aspect_ratio must be at least 1 and head_dim an even number (RoPE rotates pairs)"
        )
    base_dim = depth * aspect_ratio
    model_dim = -(-base_dim // head_dim) * head_dim
    return NanochatShape(depth, base_dim, model_dim, model_dim // head_dim, head_dim)


def window_sizes(window_pattern: str, depth: int, sequence_len: int) -> list[int]:
    """Each layer's attention window in tokens: the pattern tiled over the layers (L = sequence_len,
    S = half of it), the last layer always L. A query at position q sees keys k with 0 <= q - k <= window."""
    pattern = window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(
            f"model.window_pattern={window_pattern!r} must be a non-empty string of S (half context) "
            "and L (full context), e.g. SSSL"
        )
    sizes = {"L": sequence_len, "S": sequence_len // 2}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(depth)]
    windows[-1] = sequence_len
    return windows


def has_value_embedding(layer: int, depth: int) -> bool:
    """Alternating layers, counted back from the last (which always has one)."""
    return layer % 2 == (depth - 1) % 2


def window_mask(seq_len: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """(seq_len, seq_len) boolean mask, True where query q may attend to key k: 0 <= q - k <= window."""
    distance = torch.arange(seq_len, device=device)[:, None] - torch.arange(seq_len, device=device)[None, :]
    return (distance >= 0) & (distance <= window)


def windowed_causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int, backend: str) -> Tensor:
    """Causal attention limited to the last `window` keys; q, k, v are (batch, heads, seq, head_dim).

    A window as long as the sequence is plain causal attention (SDPA's flash path). Shorter windows:
    `sdpa` passes an explicit boolean mask (exact, any device: nanochat's own fallback without
    Flash Attention 3); `flex` uses FlexAttention with a block mask of the same rule, which skips the
    masked blocks instead of computing them (fast once torch.compile'd, on CUDA).
    """
    seq_len = q.size(-2)
    if window >= seq_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def in_window(batch, head, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

        block_mask = create_block_mask(in_window, None, None, seq_len, seq_len, device=q.device)
        return flex_attention(q, k, v, block_mask=block_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(seq_len, window, q.device))


def norm(x: Tensor) -> Tensor:
    """Parameter-free RMS norm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


class CausalSelfAttention(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, head_dim: int, value_embedding: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.c_q = nn.Linear(model_dim, num_heads * head_dim, bias=False)
        self.c_k = nn.Linear(model_dim, num_heads * head_dim, bias=False)
        self.c_v = nn.Linear(model_dim, num_heads * head_dim, bias=False)
        self.c_proj = nn.Linear(model_dim, model_dim, bias=False)
        # One gate per key/value head, read from the block input's first channels.
        self.ve_gate = nn.Linear(VALUE_GATE_CHANNELS, num_heads, bias=False) if value_embedding else None

    def forward(
        self, x: Tensor, value_embed: Tensor | None, cos: Tensor, sin: Tensor, window: int, backend: str
    ) -> Tensor:
        batch, seq_len, _ = x.shape
        heads = (batch, seq_len, self.num_heads, self.head_dim)
        q, k, v = self.c_q(x).view(heads), self.c_k(x).view(heads), self.c_v(x).view(heads)
        if value_embed is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VALUE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embed.view(heads)
        # nanochat rotates first, then RMS-norms q and k.
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        y = windowed_causal_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, backend
        )
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, model_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(model_dim, 4 * model_dim, bias=False)
        self.c_proj = nn.Linear(4 * model_dim, model_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, head_dim: int, value_embedding: bool):
        super().__init__()
        self.attn = CausalSelfAttention(model_dim, num_heads, head_dim, value_embedding)
        self.mlp = MLP(model_dim)

    def forward(
        self, x: Tensor, value_embed: Tensor | None, cos: Tensor, sin: Tensor, window: int, backend: str
    ) -> Tensor:
        x = x + self.attn(norm(x), value_embed, cos, sin, window, backend)
        return x + self.mlp(norm(x))


class NanochatGPT(nn.Module):
    """nanochat's GPT; `depth` sets the shape (see the module docstring and `nanochat_shape`).

    sequence_len: the longest sequence trained on; the windows are fractions of it, and RoPE tables
    cover 10x it (nanochat's margin for generation).
    attention: `auto` (FlexAttention when compiled on CUDA, the exact masked SDPA elsewhere), `sdpa`
    or `flex`.
    """

    def __init__(
        self,
        vocab_size: int = 32768,
        depth: int = 20,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        sequence_len: int = 2048,
        window_pattern: str = "SSSL",
        logit_softcap: float = 15.0,
        rope_base: float = 10000.0,
        pad_vocab_to: int = 64,
        attention: str = "auto",
    ):
        super().__init__()
        self.shape = nanochat_shape(depth, aspect_ratio, head_dim)
        _check_settings(self.shape, vocab_size, sequence_len, logit_softcap, pad_vocab_to, attention)
        dim, heads = self.shape.model_dim, self.shape.num_heads
        self.vocab_size = vocab_size
        self.padded_vocab_size = -(-vocab_size // pad_vocab_to) * pad_vocab_to
        self.logit_softcap = logit_softcap
        self.attention = attention
        self.window_sizes = window_sizes(window_pattern, depth, sequence_len)
        ve_layers = [i for i in range(depth) if has_value_embedding(i, depth)]
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(self.padded_vocab_size, dim),
                "h": nn.ModuleList([Block(dim, heads, head_dim, i in ve_layers) for i in range(depth)]),
            }
        )
        self.lm_head = nn.Linear(dim, self.padded_vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(depth))
        self.x0_lambdas = nn.Parameter(torch.zeros(depth))
        # Both are `scalar`s; nanochat's optimizer gives them different settings, told apart by this tag.
        setattr(self.resid_lambdas, SCALAR_KIND_ATTRIBUTE, "resid")
        setattr(self.x0_lambdas, SCALAR_KIND_ATTRIBUTE, "x0")
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(self.padded_vocab_size, dim) for i in ve_layers}
        )
        cos, sin = rotary_tables(10 * sequence_len, head_dim, rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()
        log.info(
            "nanochat: depth %d -> model_dim %d (base %d, nudge %+d), %d heads x %d, mlp %d, "
            "windows %s, value embeddings on layers %s, vocab %d (padded to %d)",
            depth, dim, self.shape.base_dim, dim - self.shape.base_dim, heads, head_dim, 4 * dim,
            self.window_sizes, ve_layers, vocab_size, self.padded_vocab_size,
        )  # fmt: skip

    @torch.no_grad()
    def _init_weights(self) -> None:
        """nanochat's initialisation: N(0, 1) token embedding, N(0, 0.001) head, U(±√3/√dim) for
        the input-side matrices and value embeddings (the std of N(0, 1/dim)), zero output
        projections (every block starts as the identity), zero gates (a gate of 1), resid 1, x0 0.1."""
        dim = self.shape.model_dim
        bound = 3**0.5 * dim**-0.5
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)

    def _backend(self, device: torch.device) -> str:
        """FlexAttention pays off only compiled (uncompiled, it computes every block); `auto` uses it
        where torch.compile runs on CUDA, the masked SDPA elsewhere. Both compute the same attention."""
        if self.attention == "auto":
            return "flex" if device.type == "cuda" and torch.compiler.is_compiling() else "sdpa"
        return self.attention

    def logits(self, input_ids: Tensor) -> Tensor:
        """Soft-capped fp32 logits over the real vocabulary, shape (batch, seq, vocab_size)."""
        seq_len = input_ids.size(1)
        if seq_len > self.cos.size(1):
            raise ValueError(
                f"a sequence of {seq_len} tokens is longer than the RoPE tables ({self.cos.size(1)}, "
                "10 x model.sequence_len); raise model.sequence_len"
            )
        cos, sin = self.cos[:, :seq_len], self.sin[:, :seq_len]
        backend = self._backend(input_ids.device)
        x = norm(self.transformer.wte(input_ids))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, value_embed, cos, sin, self.window_sizes[i], backend)
        logits = self.lm_head(norm(x))[..., : self.vocab_size].float()
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (fp32 scalar)."""
        logits = self.logits(input_ids)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), target_ids.reshape(-1), reduction="mean")

    def parameter_roles(self) -> dict[str, str]:
        """nanochat's optimizer split (speedrun/models/protocol.py): the token and value embeddings
        are `embed`, the head `head`, every weight inside the blocks (the value gates included) a Muon
        `matrix`, and the per-layer lambdas `scalar`."""
        roles = {"transformer.wte.weight": "embed"}
        roles.update({f"value_embeds.{name}": "embed" for name, _ in self.value_embeds.named_parameters()})
        roles["lm_head.weight"] = "head"
        roles.update({f"transformer.h.{name}": "matrix" for name, _ in self.transformer.h.named_parameters()})
        roles["resid_lambdas"] = "scalar"
        roles["x0_lambdas"] = "scalar"
        return roles

    def flops_per_token(self, seq_len: int) -> float:
        """nanochat's estimate: 6 per weight that takes part in a matmul (everything but the embedding
        lookups and the lambdas) plus 12·heads·head_dim·min(window, seq_len) per layer for attention."""
        lookups = self.transformer.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        lambdas = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul = sum(p.numel() for p in self.parameters()) - lookups - lambdas
        per_key = 12 * self.shape.num_heads * self.shape.head_dim
        attention = sum(per_key * min(window, seq_len) for window in self.window_sizes)
        return float(6 * matmul + attention)

    def cast_for_mixed_precision(self) -> None:
        """nanochat's bf16 recipe: the token and value embeddings are stored (and trained) in bf16 to
        save memory; every other weight stays fp32 and autocast casts it for the matmuls."""
        self.transformer.wte.to(dtype=torch.bfloat16)
        self.value_embeds.to(dtype=torch.bfloat16)


def rotary_tables(length: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """RoPE cos/sin, shape (1, length, 1, head_dim/2) for (batch, seq, heads, head_dim) tensors.

    Kept in bf16 as nanochat keeps them (also on CPU in fp32, where they then round the angles).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]


def _check_settings(
    shape: NanochatShape,
    vocab_size: int,
    sequence_len: int,
    logit_softcap: float,
    pad_vocab_to: int,
    attention: str,
) -> None:
    if shape.model_dim < VALUE_GATE_CHANNELS:
        raise ValueError(
            f"model_dim={shape.model_dim} (model.depth x model.aspect_ratio, rounded up to model.head_dim) "
            f"is below the {VALUE_GATE_CHANNELS} channels the value-embedding gates read; raise one of them"
        )
    if vocab_size < 1 or pad_vocab_to < 1:
        raise ValueError(
            f"model.vocab_size={vocab_size} and model.pad_vocab_to={pad_vocab_to} must be positive"
        )
    if sequence_len < 2:
        raise ValueError(f"model.sequence_len={sequence_len} must be at least 2")
    if logit_softcap <= 0:
        raise ValueError(f"model.logit_softcap={logit_softcap} must be positive")
    if attention not in ("auto", "sdpa", "flex"):
        raise ValueError(f"model.attention={attention!r} must be auto, sdpa or flex")
