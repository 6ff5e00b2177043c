"""Muon as modded-nanogpt's record #20 runs it: batched over leading dimensions, EMA momentum.

Two differences from parameter-golf's Muon (speedrun/optim/muon.py, kept separate so that its
numbers stay bit for bit):
- a parameter of shape (..., rows, cols) is a batch of matrices, each orthogonalised on its own
  (the record's merged (3, dim, dim) QKV weight is three matrices, with no split or concatenation);
- the momentum buffer is an average, buf <- lerp(buf, grad, 1 - momentum), and the Nesterov step
  lerp(grad, buf, momentum), where parameter-golf's sums buf <- momentum * buf + grad. Newton-Schulz
  normalises its input, so the two agree at a constant momentum; they differ while it warms up.
The step of each matrix is lr * sqrt(max(1, rows / cols)), applied in the parameter's precision.

Under torch.distributed the work is shared as in muon.py (parameter i is orthogonalised by rank
i % world_size, one all_reduce of a flat bf16 buffer shares the results), and every rank keeps every
momentum buffer, so rank 0's state resumes a run at any world size. (The record instead all-gathers
same-sized updates and keeps each buffer on its owner only: the same arithmetic.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from speedrun.optim.muon import NS_COEFFICIENTS, current_momentum


def batched_newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each matrix of G (..., rows, cols), in bf16."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    # Each matrix scaled to spectral norm <= 1 (its Frobenius norm bounds the spectral one).
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


@functools.cache
def compiled_batched_newton_schulz() -> Callable[..., Tensor]:
    """torch.compile'd once and shared (the record compiles it too)."""
    return torch.compile(batched_newton_schulz)


class BatchedMuon(torch.optim.Optimizer):
    """Muon (always Nesterov) for parameters of 2 or more dimensions, the last two being each matrix.

    momentum_warmup_steps > 0 ramps the momentum linearly from momentum_warmup_start to `momentum`
    (the record: 0.85 -> 0.95 over 300 steps); the step count lives in each param group, so it is
    saved and restored with the optimizer's state.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float,
        momentum_warmup_start: float = 0.0,
        momentum_warmup_steps: int = 0,
        backend_steps: int = 5,
        compile_newtonschulz: bool = False,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            momentum_warmup_start=momentum_warmup_start,
            momentum_warmup_steps=momentum_warmup_steps,
            steps_taken=0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"BatchedMuon needs parameters of 2 or more dimensions; got shape {tuple(p.shape)}"
                    )
        self._orthogonalise = (
            compiled_batched_newton_schulz() if compile_newtonschulz else batched_newton_schulz
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if params:
                self._step_group(group, params, rank, world_size, distributed)
            group["steps_taken"] += 1
        return loss

    def _step_group(
        self, group: dict, params: list[Tensor], rank: int, world_size: int, distributed: bool
    ) -> None:
        momentum = current_momentum(group)
        updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
        offset = 0
        for i, p in enumerate(params):
            if p.grad is not None:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                if i % world_size == rank:
                    nesterov = p.grad.lerp(buf, momentum)
                    updates[offset : offset + p.numel()] = self._orthogonalise(
                        nesterov, group["backend_steps"]
                    ).flatten()
            offset += p.numel()
        if distributed:
            dist.all_reduce(updates, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            # Tall matrices take a larger step, so the update's RMS does not shrink with the aspect ratio.
            aspect = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
            p.add_(updates[offset : offset + p.numel()].view_as(p), alpha=-group["lr"] * aspect)
            offset += p.numel()
