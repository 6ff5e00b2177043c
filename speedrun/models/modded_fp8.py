"""The FP8 output-head matmul of modded-nanogpt's record #20, for GPUs that have FP8 tensor cores.

The head is the largest matmul of the model (768 x 50,304); the record runs it, in training only,
as `torch._scaled_mm` on float8 copies of its input and weight: forward in e4m3 with fast
accumulation, the output gradient in e5m2. Fixed scales (the record's) keep the values inside
float8's range: input x 2, weight x 32, output gradient x 2^29.

It is a `torch.library.custom_op`, so torch.compile treats it as one opaque call with the shapes its
fake implementation declares, and autograd uses the FP8 backward registered below. Everything
else (CPU, older GPUs, shapes FP8 kernels refuse) takes the ordinary matmul: `fp8_unavailable`
says why, and the model logs that once.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Scales of the record (x_s, w_s, grad_s): multiply before the cast to float8, divide after the matmul.
INPUT_SCALE = 2.0
WEIGHT_SCALE = 32.0
GRAD_SCALE = 2.0**29
# FP8 tensor cores: compute capability 8.9 (Ada) and above (Hopper, Blackwell).
MIN_CAPABILITY = (8, 9)
# torch._scaled_mm needs both matrix dimensions to be multiples of 16.
DIM_MULTIPLE = 16


def fp8_unavailable(weight: Tensor) -> str | None:
    """Why the FP8 head cannot run for this weight (out_features, in_features), or None if it can."""
    if weight.device.type != "cuda":
        return f"the head is on {weight.device.type}, not a CUDA GPU"
    capability = torch.cuda.get_device_capability(weight.device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(weight.device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}; FP8 matmuls need 8.9 or above"
    rows, cols = weight.shape
    if rows % DIM_MULTIPLE or cols % DIM_MULTIPLE:
        return f"the head's shape {rows} x {cols} is not a multiple of {DIM_MULTIPLE} in both dimensions"
    return None


def _scale(x: Tensor, scale: float) -> Tensor:
    return x.new_tensor(scale, dtype=torch.float32)


@functools.cache
def _compiled_forward():
    # Compiled, as the record does, so the scale-and-cast passes fuse with their neighbours.
    @torch.compile
    def forward(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_f8 = x.mul(INPUT_SCALE).to(torch.float8_e4m3fn)
        w_f8 = w.mul(WEIGHT_SCALE).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            x_f8, w_f8.t(), out_dtype=torch.bfloat16,
            scale_a=_scale(x, 1 / INPUT_SCALE), scale_b=_scale(x, 1 / WEIGHT_SCALE), use_fast_accum=True,
        )  # fmt: skip
        return out, x_f8, w_f8

    return forward


@functools.cache
def _compiled_backward():
    @torch.compile
    def backward(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
        grad_f8 = grad.mul(GRAD_SCALE).to(torch.float8_e5m2)
        # _scaled_mm wants its first operand row-major and its second column-major.
        grad_x = torch._scaled_mm(
            grad_f8, w_f8.t().contiguous().t(), out_dtype=torch.bfloat16,
            scale_a=_scale(grad, 1 / GRAD_SCALE), scale_b=_scale(grad, 1 / WEIGHT_SCALE),
            use_fast_accum=False,
        )  # fmt: skip
        # The weight gradient in fp32, computed transposed: faster for a wide head (the record's finding).
        grad_w = torch._scaled_mm(
            x_f8.t().contiguous(), grad_f8.t().contiguous().t(), out_dtype=torch.float32,
            scale_a=_scale(grad, 1 / INPUT_SCALE), scale_b=_scale(grad, 1 / GRAD_SCALE), use_fast_accum=False,
        ).t()  # fmt: skip
        return grad_x, grad_w

    return backward


@torch.library.custom_op("speedrun::fp8_matmul", mutates_args=())
def fp8_matmul(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, in) bf16 @ w (out, in).T in FP8 -> (bf16 output, the float8 copies saved for backward)."""
    return _compiled_forward()(x, w)


@fp8_matmul.register_fake
def _(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    out = x.new_empty((x.size(0), w.size(0)), dtype=torch.bfloat16)
    return (
        out,
        x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
        w.new_empty(w.shape, dtype=torch.float8_e4m3fn),
    )


@torch.library.custom_op("speedrun::fp8_matmul_backward", mutates_args=())
def fp8_matmul_backward(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    return _compiled_backward()(grad, x_f8, w_f8)


@fp8_matmul_backward.register_fake
def _(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    return x_f8.new_empty(x_f8.shape, dtype=torch.bfloat16), w_f8.new_empty(w_f8.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    _, x_f8, w_f8 = output
    ctx.save_for_backward(x_f8, w_f8)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out: Tensor, *_unused) -> tuple[Tensor, Tensor]:
    x_f8, w_f8 = ctx.saved_tensors
    return fp8_matmul_backward(grad_out.contiguous(), x_f8, w_f8)


fp8_matmul.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` through the FP8 matmul: x (..., in) -> (..., out) in bf16."""
    flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16).contiguous()
    return fp8_matmul(flat, weight.contiguous())[0].reshape(*x.shape[:-1], -1)
