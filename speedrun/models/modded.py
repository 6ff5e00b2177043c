"""modded-nanogpt's record-#20 model ("Sub3Min", 2025-01-16: val loss 3.28 in 2.992 minutes on 8xH100).

The math of the record's train_gpt.py (KellerJordan/modded-nanogpt, records/011625_Sub3Min), with
its 12-layer patterns made configurable for any depth:
- an RMS-normed token embedding that every block also mixes back in (the "x0" mix, learned per block),
- U-net skips: the first half's outputs are added back, last in first out, with learned weights,
- value embeddings: extra token embeddings added to the attention values, in a "012 ... 012" pattern
  (the first n layers and the last n layers use embeddings 0..n-1),
- one merged QKV weight of shape (3, dim, dim), which Muon orthogonalises as a batch of three,
- RMS-normed q and k, half-truncated RoPE (a quarter of the frequencies, base 1024; the other half of
  each head's dimensions does not rotate), a fixed attention scale of 0.12,
- sliding-window attention inside documents over one long packed sequence (speedrun/models/attention.py):
  "long" layers see W blocks of 128 tokens back, "short" ones W // 2 (at least one); W grows with
  training progress from 1 block to ceil(1728 / 128) = 14 blocks,
- no attention at all in one layer (the 8th of 12),
- a ReLU² MLP, zero-initialised output projections and head, the head padded to a multiple of 128,
- logits 30 sigmoid(z / 7.5) = 15 tanh(z / 15) + 15: a soft cap of 15, shifted by +15,
- in bf16 training on a GPU with FP8 tensor cores, the head's matmul in FP8 (speedrun/models/modded_fp8.py).

Modules are created in the record's order, with its initialisation, so the same seed draws the
same weights as its script would on the same device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.models.attention import dense_window_mask, document_ids, flex_block_mask, windowed_attention
from speedrun.models.gpt import CastedLinear
from speedrun.models.modded_fp8 import fp8_linear, fp8_unavailable

log = logging.getLogger("speedrun")


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class UniformLinear(CastedLinear):
    """A bias-free CastedLinear initialised as the record's: uniform with std 0.5 / sqrt(in_features)
    (0.5 worked a bit better than nn.Linear's 1/sqrt(3))."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-uniform_bound(self.in_features), uniform_bound(self.in_features))


def uniform_bound(fan_in: int) -> float:
    """The half-width of a uniform distribution with std 0.5 / sqrt(fan_in)."""
    return math.sqrt(3) * 0.5 * fan_in**-0.5


class HalfTruncatedRotary(nn.Module):
    """RoPE on half of each head's dimensions: head_dim / 4 frequencies from 1 down to 1/1024, and
    head_dim / 4 zero frequencies (those dimension pairs pass through unrotated).

    The cos/sin tables (fp32) are cached for the last sequence length, in non-persistent buffers (they
    follow the module's device and stay out of the state dict); positions count from the start of the
    packed row, not of each document, as in the record.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        quarter = head_dim // 4
        angular_freq = (1 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
        angular_freq = torch.cat([angular_freq, angular_freq.new_zeros(quarter)])
        self.register_buffer("angular_freq", angular_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0, 2 * quarter), persistent=False)
        self.register_buffer("sin", torch.empty(0, 2 * quarter), persistent=False)

    def tables(self, seq_len: int) -> tuple[Tensor, Tensor]:
        if self.cos.size(0) != seq_len:
            positions = torch.arange(seq_len, device=self.angular_freq.device, dtype=torch.float32)
            theta = torch.outer(positions, self.angular_freq.float())
            self.cos, self.sin = theta.cos(), theta.sin()
        return self.cos, self.sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (batch, T, heads, head_dim) by the (T, head_dim / 2) tables, in fp32."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_scale = attn_scale
        # Q, K and V weights in one (3, dim, dim) tensor: one matmul, and Muon orthogonalises each
        # of the three separately (a batch) without splitting or concatenating anything.
        bound = uniform_bound(dim)
        self.qkv_w = nn.Parameter(torch.empty(3, dim, dim).uniform_(-bound, bound))
        # How much of the layer's own values (0) and of its value embedding (1) the attention mixes.
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.c_proj = UniformLinear(dim, dim)
        self.c_proj.weight.detach().zero_()

    def project(self, x: Tensor, value_embed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (batch, T, heads, head_dim), before norms and RoPE; v already mixes in the
        value embedding."""
        batch, seq_len, _ = x.shape
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(batch, seq_len, 3 * self.num_heads, -1).chunk(3, dim=-2)
        if value_embed is None:
            return q, k, self.lambdas[0] * v
        return q, k, self.lambdas[0] * v + self.lambdas[1] * value_embed.view_as(v)

    def forward(self, x: Tensor, value_embed: Tensor | None, rope: tuple[Tensor, Tensor], mask) -> Tensor:
        q, k, v = self.project(x, value_embed)
        q, k = apply_rotary(norm(q), *rope), apply_rotary(norm(k), *rope)
        y = windowed_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.attn_scale)
        return self.c_proj(y.transpose(1, 2).contiguous().view_as(x))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.c_fc = UniformLinear(dim, mlp_mult * dim)
        self.c_proj = UniformLinear(mlp_mult * dim, dim)
        self.c_proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_mult: int, attn_scale: float, has_attention: bool):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, attn_scale) if has_attention else None
        self.mlp = MLP(dim, mlp_mult)
        # The mix of the running residual (0) and the normalised embedding x0 (1); starts as "x only".
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: Tensor, value_embed: Tensor | None, x0: Tensor, rope, mask) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), value_embed, rope, mask)
        return x + self.mlp(norm(x))


class ModdedGPT(nn.Module):
    def __init__(
        self,
        vocab_size: int = 50257,
        num_layers: int = 12,
        model_dim: int = 768,
        num_heads: int = 6,
        mlp_mult: int = 4,
        vocab_pad_multiple: int = 128,
        num_value_embeds: int = 3,
        value_embed_layers: Sequence[int] | None = None,
        window_pattern: str = "LSSSLS",
        skip_attention_layers: Sequence[int] = (7,),
        window_block_size: int = 128,
        max_window_tokens: int = 1728,
        attn_scale: float = 0.12,
        logit_softcap: float = 15.0,
        bos_id: int = 50256,
        fp8_head: bool = True,
    ):
        super().__init__()
        _check_sizes(
            vocab_size, num_layers, model_dim, num_heads, bos_id, window_block_size, max_window_tokens
        )
        if logit_softcap <= 0:
            raise ValueError(f"model.logit_softcap={logit_softcap} must be positive")
        # Static per-layer plans (plain Python, so torch.compile specialises on them).
        self.value_embed_of_layer = value_embed_plan(num_layers, num_value_embeds, value_embed_layers)
        self.long_window_layer = window_plan(num_layers, window_pattern)
        skipped = attention_skip_plan(num_layers, skip_attention_layers, self.value_embed_of_layer)
        self.window_block_size = window_block_size
        self.max_window_tokens = max_window_tokens
        self.logit_softcap = logit_softcap
        self.bos_id = bos_id
        self.fp8_head = fp8_head
        self.use_fp8_head = False  # decided by cast_for_mixed_precision, on the training device
        self.num_encoder_layers = num_layers // 2

        self.embed = nn.Embedding(vocab_size, model_dim)
        self.value_embeds = nn.ModuleList(
            [nn.Embedding(vocab_size, model_dim) for _ in range(num_value_embeds)]
        )
        self.blocks = nn.ModuleList(
            [Block(model_dim, num_heads, mlp_mult, attn_scale, i not in skipped) for i in range(num_layers)]
        )
        # One weight per decoder layer that receives a skip (all of them at even depth).
        self.skip_weights = nn.Parameter(
            torch.ones(min(self.num_encoder_layers, num_layers - self.num_encoder_layers))
        )
        # 50,257 GPT-2 tokens, padded to 50,304 rows for faster kernels; the extra rows are never targets.
        padded_vocab = math.ceil(vocab_size / vocab_pad_multiple) * vocab_pad_multiple
        self.lm_head = UniformLinear(model_dim, padded_vocab)
        self.lm_head.weight.detach().zero_()
        self.rotary = HalfTruncatedRotary(model_dim // num_heads)
        # The long window in blocks, set from training progress (set_progress). A buffer, not a Python
        # int, so a compiled forward reads the new value instead of recompiling for each one.
        self.register_buffer("window_blocks", torch.tensor(1, dtype=torch.int32), persistent=False)
        self._window_blocks_set = 1

    # ------------------------------------------------------------------ protocol (models/protocol.py)

    def set_progress(self, fraction: float) -> None:
        """Warm the windows up with training: ceil(max_window_tokens x fraction / block) blocks, at least
        1 (the record's next_multiple_of_n(1728 * step / steps, n=128): 128 tokens at the start, 1,792
        at the end)."""
        blocks = max(1, math.ceil(self.max_window_tokens * fraction / self.window_block_size))
        if blocks != self._window_blocks_set:
            self.window_blocks.fill_(blocks)
            self._window_blocks_set = blocks

    def parameter_roles(self) -> dict[str, str]:
        """The record's optimizer split: token and value embeddings are `embed` (Adam, lr 0.6), the head
        `head`, every block tensor of 2 or more dimensions `matrix` (Muon, the QKV weight as a batch of
        three), the per-block and skip scalars `scalar`; in the record's order."""
        roles = {"embed.weight": "embed"}
        roles.update({f"value_embeds.{i}.weight": "embed" for i in range(len(self.value_embeds))})
        roles["lm_head.weight"] = "head"
        for name, param in self.blocks.named_parameters():
            roles[f"blocks.{name}"] = "matrix" if param.ndim >= 2 else "scalar"
        if self.skip_weights.numel() > 0:  # a single layer has nothing to skip over
            roles["skip_weights"] = "scalar"
        return roles

    def flops_per_token(self, seq_len: int) -> float:
        """6 per matmul weight (blocks and head), plus 12 x dim x the keys each query sees, per attention
        layer (nanochat's convention, counting a sliding window as its full width once warmed up)."""
        roles = self.parameter_roles()
        params = dict(self.named_parameters())
        matmul = sum(params[name].numel() for name, role in roles.items() if role in ("matrix", "head"))
        long_blocks = math.ceil(self.max_window_tokens / self.window_block_size)
        widths = {True: long_blocks, False: max(1, long_blocks // 2)}
        attention = sum(
            12 * self.embed.embedding_dim * min(seq_len, widths[long] * self.window_block_size)
            for block, long in zip(self.blocks, self.long_window_layer, strict=True)
            if block.attn is not None
        )
        return float(6 * matmul + attention)

    def cast_for_mixed_precision(self) -> ModdedGPT:
        """The record's precision recipe: token and value embeddings in bf16 (so is the residual stream
        from the first op), every other weight fp32 and cast at matmul time; and, where the GPU has FP8
        tensor cores, the head's training matmul in FP8 (logged either way)."""
        for embedding in (self.embed, *self.value_embeds):
            embedding.bfloat16()
        if self.fp8_head:
            reason = fp8_unavailable(self.lm_head.weight)
            self.use_fp8_head = reason is None
            if reason:
                log.info("model.fp8_head: off, the head matmul runs in bf16 (%s)", reason)
            else:
                log.info("model.fp8_head: on (%s)", torch.cuda.get_device_name(self.lm_head.weight.device))
        return self

    # ------------------------------------------------------------------ forward

    def attention_masks(self, input_ids: Tensor) -> dict[bool, object]:
        """{long?: mask} for the window kinds the layers use: FlexAttention block masks on CUDA for
        sequences of whole blocks (training's, which config validation enforces), dense masks otherwise
        (the CPU, short sequences such as sampling); both exact."""
        docs = document_ids(input_ids, self.bos_id)
        whole_blocks = input_ids.size(-1) % self.window_block_size == 0
        build = flex_block_mask if input_ids.is_cuda and whole_blocks else dense_window_mask
        windows = {True: self.window_blocks, False: torch.clamp_min(self.window_blocks // 2, 1)}
        kinds = {
            long
            for block, long in zip(self.blocks, self.long_window_layer, strict=True)
            if block.attn is not None
        }
        return {long: build(docs, windows[long], self.window_block_size) for long in kinds}

    def logits(self, input_ids: Tensor) -> Tensor:
        """(batch, T, padded vocab) fp32 logits, soft-capped and shifted into (0, 2 x logit_softcap)."""
        masks = self.attention_masks(input_ids)
        rope = self.rotary.tables(input_ids.size(-1))
        x = x0 = norm(self.embed(input_ids))
        value_embeds = [embedding(input_ids) for embedding in self.value_embeds]
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers] * skips.pop()
            ve_index = self.value_embed_of_layer[i]
            value_embed = value_embeds[ve_index] if ve_index is not None else None
            x = block(x, value_embed, x0, rope, masks.get(self.long_window_layer[i]))
            if i < self.num_encoder_layers:
                skips.append(x)
        x = norm(x)
        if self.training and self.use_fp8_head:
            raw = fp8_linear(x, self.lm_head.weight)
        else:
            raw = self.lm_head(x)
        # 2c sigmoid(z / (c/2)) = c tanh(z / c) + c: the record's shifted soft cap (30 sigmoid(z / 7.5)).
        return 2 * self.logit_softcap * torch.sigmoid(raw.float() / (self.logit_softcap / 2))

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (fp32 scalar) over the padded vocabulary, as the record."""
        logits = self.logits(input_ids)
        return F.cross_entropy(logits.flatten(end_dim=-2), target_ids.flatten())


# ---------------------------------------------------------------------- per-layer plans and checks


def value_embed_plan(num_layers: int, count: int, layers: Sequence[int] | None) -> tuple[int | None, ...]:
    """Which value embedding each layer adds (None: none). `layers` lists one index (or -1) per layer;
    None means the record's U-net pattern: embeddings 0..count-1 in the first `count` layers and again,
    in the same order, in the last `count` layers."""
    if count < 0:
        raise ValueError(f"model.num_value_embeds={count} must be >= 0")
    if layers is None:
        if 2 * count > num_layers:
            raise ValueError(
                f"model.num_value_embeds={count} needs {2 * count} layers (the first {count} and the last "
                f"{count}) but model.num_layers={num_layers}; lower it or list them in model.value_embed_layers"
            )
        plan = [i if i < count else None for i in range(num_layers)]
        for j in range(count):
            plan[num_layers - count + j] = j
        return tuple(plan)
    layers = list(layers)
    if len(layers) != num_layers or any(not -1 <= v < count for v in layers):
        raise ValueError(
            f"model.value_embed_layers={layers} must give each of the model.num_layers={num_layers} layers "
            f"a value embedding in 0..{count - 1} (model.num_value_embeds={count}) or -1 for none"
        )
    unused = sorted(set(range(count)) - set(layers))
    if unused:
        raise ValueError(
            f"model.value_embed_layers={layers} never uses value embeddings {unused}; "
            f"lower model.num_value_embeds or assign them to a layer"
        )
    return tuple(None if v < 0 else v for v in layers)


def window_plan(num_layers: int, pattern: str) -> tuple[bool, ...]:
    """Long (True) or short (False) window per layer: `pattern` (L/S) tiled over the first half and
    mirrored onto the second, so the U-net stays symmetric ("LSSSLS" at 12 layers: LSSSLS SLSSSL)."""
    if not pattern or set(pattern) - {"L", "S"}:
        raise ValueError(
            f"model.window_pattern={pattern!r} must be a non-empty string of L (long) and S (short)"
        )
    return tuple(pattern[min(i, num_layers - 1 - i) % len(pattern)] == "L" for i in range(num_layers))


def attention_skip_plan(
    num_layers: int, skip_layers: Sequence[int], value_embed_of_layer: tuple[int | None, ...]
) -> set[int]:
    skipped = set(skip_layers)
    outside = sorted(i for i in skipped if not 0 <= i < num_layers)
    if outside:
        raise ValueError(
            f"model.skip_attention_layers={list(skip_layers)} names layers {outside}, but "
            f"model.num_layers={num_layers} has layers 0..{num_layers - 1}; pick layers in range, or [] to "
            "keep attention everywhere"
        )
    with_values = sorted(i for i in skipped if value_embed_of_layer[i] is not None)
    if with_values:
        raise ValueError(
            f"model.skip_attention_layers={list(skip_layers)} drops the attention of layers {with_values}, "
            "which add a value embedding; skip other layers or change model.value_embed_layers / num_value_embeds"
        )
    return skipped


def _check_sizes(
    vocab_size: int, num_layers: int, model_dim: int, num_heads: int, bos_id: int, block: int, max_window: int
) -> None:
    if num_layers < 1 or num_heads < 1 or vocab_size < 1:
        raise ValueError(
            f"model.num_layers={num_layers}, model.num_heads={num_heads}, model.vocab_size={vocab_size}: "
            "each must be at least 1"
        )
    if model_dim % num_heads or (model_dim // num_heads) % 4:
        raise ValueError(
            f"model.model_dim={model_dim} / model.num_heads={num_heads} must be a whole head size divisible "
            f"by 4 (half-truncated RoPE rotates a quarter of the frequencies); e.g. model_dim={4 * num_heads * 16}"
        )
    if not -1 <= bos_id < vocab_size:
        raise ValueError(
            f"model.bos_id={bos_id} is outside the vocabulary (model.vocab_size={vocab_size}); set it to the "
            "data's BOS id (50256 for GPT-2 tokens, 1 for data=stdlib and speedrun.prepare), or -1 to attend "
            "across documents"
        )
    if block < 1 or max_window < 1:
        raise ValueError(
            f"model.window_block_size={block} and model.max_window_tokens={max_window} must be positive"
        )
