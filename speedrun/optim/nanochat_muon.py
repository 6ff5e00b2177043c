"""nanochat's Muon (karpathy/nanochat 07c4dd4, `nanochat/optim.py`): one step of it is

1. Nesterov momentum, written as two lerps: m <- lerp(m, g, 1 - μ), then u = lerp(g, m, μ);
2. orthogonalisation by Polar Express (Amsel et al. 2025, https://arxiv.org/abs/2505.16932): five
   odd quintic polynomials, each tuned for its own iteration, instead of Newton–Schulz's one fixed
   quintic, in bf16;
3. a factored second moment ("NorMuon", https://arxiv.org/abs/2510.05491): an EMA of the update's mean
   square per row (per column for wide matrices) rescales the rows to a common size, then the whole
   update is scaled back to the norm it had;
4. cautious weight decay: the decoupled decay applies only where the update and the weight agree in
   sign (where the step already moves the weight towards zero);
with the learning rate scaled by √max(1, rows/cols), and matrices of one shape stacked so each step
is a few batched matmuls.

Schedules this optimizer owns (its state, so a checkpoint restores them): momentum warmed up linearly
from momentum_warmup_start over momentum_warmup_steps, and the weight decay decayed linearly to zero
over the run's horizon (given by `set_horizon`; constant without one).

Under torch.distributed each rank orthogonalises its share of every stack and one all_reduce hands the
new weights (and second moments) to all ranks; every rank updates the whole momentum itself (cheap,
from identical gradients), so the state is the same everywhere and rank 0's checkpoint resumes at any
world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from speedrun.optim.muon import current_momentum, decayed_step

# Polar Express's coefficients (a, b, c) of p(x) = a·x + b·x³ + c·x⁵, one triple per iteration,
# as nanochat uses them (the paper's, computed for 5 iterations, safety factor 2e-2, cushion 2).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Push the singular values of each matrix in G (..., rows, cols) towards 1, keeping its singular
    vectors: each iteration maps every singular value σ to p(σ). G is first scaled to Frobenius norm
    1/1.02, so that every singular value starts inside (0, 1), where the polynomials are tuned."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        # The Gram matrix of the shorter side is the cheaper one: Xᵀ X for tall, X Xᵀ for wide.
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def normalize_variance(update: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon's step on a stack of updates (n, rows, cols); updates `second_moment` in place.

    second_moment has shape (n, rows, 1) when rows >= cols, else (n, 1, cols): an EMA of the
    update's mean square along the longer side. Each row (column) is divided by the root of its EMA,
    then the matrix is scaled back to its original Frobenius norm, so only the balance between rows
    (columns) changes, not the step's size.
    """
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    mean_square = update.float().square().mean(dim=reduce_dim, keepdim=True)
    length = update.size(reduce_dim)
    norm_before = (mean_square.sum(dim=(-2, -1), keepdim=True) * length).sqrt()
    second_moment.lerp_(mean_square.to(second_moment.dtype), 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((mean_square * length) * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return update * (scale * (norm_before / norm_after.clamp_min(1e-10))).to(update.dtype)


def owned_slice(count: int, rank: int, world_size: int) -> slice:
    """The contiguous share of `count` stacked matrices that `rank` orthogonalises."""
    per_rank = -(-count // world_size)
    start = min(rank * per_rank, count)
    return slice(start, min(start + per_rank, count))


def gather_shares(tensor: Tensor, owned: slice) -> None:
    """Give every rank the whole stacked `tensor`, each rank having computed its `owned` share: zero the
    rest and sum (adding zeros is exact, so every rank gets exactly the owner's values)."""
    share = torch.zeros_like(tensor)
    share[owned] = tensor[owned]
    dist.all_reduce(share, op=dist.ReduceOp.SUM)
    tensor.copy_(share)


class NanochatMuon(torch.optim.Optimizer):
    """nanochat's Muon for 2-D parameters (see the module docstring); one param group per shape.

    weight_decay is the decay at step 0; it falls linearly to 0 at the horizon set by `set_horizon`.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        momentum_warmup_start: float = 0.85,
        momentum_warmup_steps: int = 300,
        beta2: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ):
        if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFICIENTS):
            raise ValueError(
                f"optimizer.ns_steps={ns_steps}: Polar Express has coefficients for 1 to "
                f"{len(POLAR_EXPRESS_COEFFICIENTS)} iterations"
            )
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only handles 2-D parameters; got one of shape {tuple(p.shape)}")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [
            {"name": f"matrix {rows}x{cols}", "params": [p for p in params if tuple(p.shape) == (rows, cols)]}
            for rows, cols in shapes
        ]
        defaults = dict(
            lr=lr,
            momentum=momentum,
            momentum_warmup_start=momentum_warmup_start,
            momentum_warmup_steps=momentum_warmup_steps,
            beta2=beta2,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            steps_taken=0,
        )
        super().__init__(groups, defaults)
        self.horizon_steps: int | None = None

    def set_horizon(self, max_steps: int | None) -> None:
        """The step at which the weight decay reaches 0 (None: keep it constant)."""
        self.horizon_steps = max_steps

    def current_weight_decay(self, group: dict) -> float:
        """The group's weight decay for its next step: linear from weight_decay to 0 over the horizon."""
        if not self.horizon_steps:
            return group["weight_decay"]
        return group["weight_decay"] * max(1 - group["steps_taken"] / self.horizon_steps, 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            self._step_group(group, rank, world_size, distributed)
            group["steps_taken"] += 1
        return loss

    def _step_group(self, group: dict, rank: int, world_size: int, distributed: bool) -> None:
        params = group["params"]
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        state = self.state[params[0]]  # the stack's buffers live with its first parameter
        rows, cols = params[0].shape
        if not state:
            state["momentum_buffer"] = torch.zeros_like(grads)
            moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_moment"] = torch.zeros(moment_shape, dtype=grads.dtype, device=grads.device)
        momentum = current_momentum(group)
        state["momentum_buffer"].lerp_(grads, 1 - momentum)
        stacked = torch.stack(params)
        owned = owned_slice(len(params), rank, world_size)
        if owned.start < owned.stop:
            nesterov = grads[owned].lerp_(state["momentum_buffer"][owned], momentum)
            update = polar_express(nesterov, group["ns_steps"])
            update = normalize_variance(update, state["second_moment"][owned], group["beta2"])
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5
            decayed_step(stacked[owned], update, lr, self.current_weight_decay(group), cautious=True)
        if distributed:
            gather_shares(stacked, owned)
            gather_shares(state["second_moment"], owned)
        torch._foreach_copy_(params, list(stacked.unbind(0)))
