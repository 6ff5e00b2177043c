"""Muon: SGD with Nesterov momentum whose 2-D updates are orthogonalized by Newton–Schulz.

As in parameter-golf (borrowed from modded-nanogpt; background: https://kellerjordan.github.io/posts/muon/).
Under torch.distributed the orthogonalizations are shared out: parameter i is processed by rank
i % world_size, and one all_reduce of a flat bf16 buffer gives every rank every update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# The quintic Newton-Schulz coefficients of Muon, here and in batched_muon.py.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize a 2-D matrix (push its singular values towards 1) in bf16.

    The quintic's coefficients are tuned for speed rather than convergence: singular values land
    roughly in [0.7, 1.2], which Muon tolerates.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    X /= X.norm() + eps
    # Iterate on the wide orientation, so X @ X.T is the smaller Gram matrix.
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


@functools.cache
def compiled_zeropower() -> Callable[..., Tensor]:
    """The torch.compile'd Newton–Schulz, built once and shared (the reference compiles it too)."""
    return torch.compile(zeropower_via_newtonschulz5)


def decayed_step(params: Tensor, update: Tensor, lr: float, weight_decay: float, cautious: bool) -> None:
    """params -= lr·update + lr·weight_decay·params: the update plus decoupled weight decay (scaled by the
    LR, not by the gradient's statistics). `cautious` decays only the coordinates where the update and
    the weight agree in sign, i.e. where the step already moves the weight towards zero."""
    decay = params * ((update * params) >= 0) if cautious else params
    params.sub_(lr * update + lr * weight_decay * decay)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters.

    momentum_warmup_steps > 0 ramps the momentum linearly from momentum_warmup_start to `momentum`
    over that many steps (the reference's schedule); the step count lives in each param group, so it
    is saved and restored with the optimizer's state.
    nesterov: the look-ahead gradient + momentum·buffer (the reference's), else the buffer itself.
    weight_decay > 0 adds decoupled weight decay (see `decayed_step`), cautious with
    cautious_weight_decay; the reference has none.
    compile_newtonschulz: run Newton–Schulz through torch.compile (worth it on CUDA; leave it off
    on CPU, where it only adds compile time and needs a C++ toolchain).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float,
        backend_steps: int = 5,
        nesterov: bool = True,
        momentum_warmup_start: float = 0.0,
        momentum_warmup_steps: int = 0,
        compile_newtonschulz: bool = False,
        weight_decay: float = 0.0,
        cautious_weight_decay: bool = False,
    ):
        if weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={weight_decay} must be >= 0 (0 = no weight decay)")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            nesterov=nesterov,
            weight_decay=weight_decay,
            cautious_weight_decay=cautious_weight_decay,
            momentum_warmup_start=momentum_warmup_start,
            momentum_warmup_steps=momentum_warmup_steps,
            steps_taken=0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D parameters; got one of shape {tuple(p.shape)}")
        self._zeropower = compiled_zeropower() if compile_newtonschulz else zeropower_via_newtonschulz5

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
            if not params:
                continue
            lr, momentum = group["lr"], current_momentum(group)
            total = sum(p.numel() for p in params)
            updates_flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if p.grad is not None:
                    # Every rank updates every momentum buffer (cheap elementwise work on identical,
                    # already all-reduced grads), so the optimizer state is the same on all ranks and
                    # rank 0's state_dict resumes a run at any world size. Only the owner
                    # orthogonalizes, which is where the time goes.
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(p.grad)
                    if i % world_size == rank:
                        g = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                        g = self._zeropower(g, steps=group["backend_steps"])
                        # Scale correction from the Muon reference implementations: tall matrices
                        # get a larger step, so the update's RMS does not shrink with the aspect ratio.
                        g *= max(1, g.size(0) / g.size(1)) ** 0.5
                        updates_flat[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates_flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                update = updates_flat[offset : offset + p.numel()].view_as(p).to(dtype=p.dtype)
                if group["weight_decay"] > 0:
                    decayed_step(p, update, lr, group["weight_decay"], group["cautious_weight_decay"])
                else:
                    p.add_(update, alpha=-lr)
                offset += p.numel()
            group["steps_taken"] += 1
        return loss


def current_momentum(group: dict) -> float:
    """The momentum of the group's next step: linear from momentum_warmup_start to momentum over
    momentum_warmup_steps steps (the step count starts at 0, as the reference's `step`)."""
    if group["momentum_warmup_steps"] <= 0:
        return group["momentum"]
    frac = min(group["steps_taken"] / group["momentum_warmup_steps"], 1.0)
    return (1 - frac) * group["momentum_warmup_start"] + frac * group["momentum"]
