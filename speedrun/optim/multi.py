"""Several torch optimizers driven as one, for the optimizers that split a model's parameters.

The trainer drives any optimizer through what every `torch.optim.Optimizer` has: `param_groups`
(whose `lr` it sets from the schedule each step), `step()`, `zero_grad()`, `state_dict()` and
`load_state_dict()`. `MultiOptimizer` offers the same over a named set of optimizers, plus the
optional global gradient-norm clipping the reference's optimizer options include.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def fused_supported(params: list[Tensor]) -> bool:
    """Fused Adam(W) kernels exist for CUDA (what the reference uses) and CPU (deterministic run to
    run, though not bitwise equal to foreach); elsewhere torch picks its default."""
    return all(p.device.type in ("cuda", "cpu") for p in params)


def groups_by_role(param_groups: list[dict]) -> dict[str, list[Tensor]]:
    """The parameters of each role from `speedrun.models.protocol.parameter_groups`' list."""
    return {group["name"]: list(group["params"]) for group in param_groups}


class MultiOptimizer:
    """Named torch optimizers stepped together; `param_groups` lists all of their groups."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], grad_clip_norm: float = 0.0):
        if grad_clip_norm < 0:
            raise ValueError(f"optimizer.grad_clip_norm={grad_clip_norm} must be >= 0 (0 disables clipping)")
        self.optimizers = optimizers
        self.grad_clip_norm = grad_clip_norm

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self) -> None:
        if self.grad_clip_norm > 0:
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One entry per optimizer, by name; holds only tensors, numbers, strings, lists and dicts."""
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state)} but this {type(self).__name__} has "
                f"{sorted(self.optimizers)}; was the checkpoint written with another optimizer "
                "or another model.tie_embeddings?"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
