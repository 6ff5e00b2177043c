"""parameter-golf's optimizer set: Muon for block matrices, Adam for everything else.

This file also holds what every optimizer set shares (speedrun.optim.adamw reuses both):
- `split_parameters`: the reference's four parameter groups, chosen by name,
- `OptimizerSet`: the interface the trainer drives (prepare_step, step, zero_grad, state_dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from speedrun.models.gpt import is_control_tensor
from speedrun.optim.muon import Muon


@dataclass
class ParameterGroups:
    """The reference's split of a GPT's parameters."""

    embed: list[nn.Parameter]  # tok_emb (also the output head when tied)
    head: list[nn.Parameter]  # lm_head, only when untied
    matrix: list[nn.Parameter]  # 2-D block weights: attention and MLP projections
    scalar: list[nn.Parameter]  # vectors, scalars and control tensors in the blocks, plus skip_weights


def split_parameters(model: nn.Module) -> ParameterGroups:
    """Group a GPT's parameters by role; every non-empty parameter lands in exactly one group."""
    block_params = list(model.blocks.named_parameters())
    groups = ParameterGroups(
        embed=[model.tok_emb.weight],
        head=[model.lm_head.weight] if model.lm_head is not None else [],
        matrix=[p for name, p in block_params if p.ndim == 2 and not is_control_tensor(name)],
        scalar=[p for name, p in block_params if p.ndim < 2 or is_control_tensor(name)],
    )
    # With a single layer there is nothing to skip over; the reference leaves the empty tensor out.
    if model.skip_weights.numel() > 0:
        groups.scalar.append(model.skip_weights)
    grouped = {id(p) for group in (groups.embed, groups.head, groups.matrix, groups.scalar) for p in group}
    for name, p in model.named_parameters():
        if p.numel() > 0 and id(p) not in grouped:
            raise ValueError(
                f"parameter {name!r} belongs to no optimizer group; "
                "extend speedrun.optim.muon_adam.split_parameters for it"
            )
    return groups


def fused_supported(params: list[Tensor]) -> bool:
    """Fused Adam(W) kernels exist for CUDA (what the reference uses) and CPU (deterministic run to
    run, though not bitwise equal to foreach); elsewhere torch picks its default."""
    return all(p.device.type in ("cuda", "cpu") for p in params)


class OptimizerSet:
    """Several torch optimizers driven as one.

    Every param group carries `base_lr`; `prepare_step` sets lr = base_lr * lr_scale before each step.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], model: nn.Module, grad_clip_norm: float):
        if grad_clip_norm < 0:
            raise ValueError(f"optimizer.grad_clip_norm={grad_clip_norm} must be >= 0 (0 disables clipping)")
        self.named_optimizers = optimizers
        self.grad_clip_norm = grad_clip_norm
        self._params = list(model.parameters())

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.named_optimizers.values())

    def prepare_step(self, step: int, lr_scale: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale

    def step(self) -> None:
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """One entry per optimizer, by name; holds only tensors, numbers, strings, lists and dicts."""
        return {name: opt.state_dict() for name, opt in self.named_optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.named_optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state)} but this {type(self).__name__} has "
                f"{sorted(self.named_optimizers)}; was the checkpoint written with another optimizer "
                "or another model.tie_embeddings?"
            )
        for name, opt in self.named_optimizers.items():
            opt.load_state_dict(state[name])


class MuonAdam(OptimizerSet):
    """The reference's optimizers: Adam on tok_emb (embed_lr: the reference's tied_embed_lr when
    tied, embed_lr when untied), Adam on an untied lm_head (head_lr), Muon on block matrices
    (matrix_lr), Adam on control/scalar parameters (scalar_lr). Muon's momentum warms up linearly
    from momentum_warmup_start to momentum over momentum_warmup_steps.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        matrix_lr: float = 0.04,
        scalar_lr: float = 0.04,
        embed_lr: float = 0.05,
        head_lr: float = 0.008,
        momentum: float = 0.95,
        momentum_warmup_start: float = 0.85,
        momentum_warmup_steps: int = 500,
        backend_steps: int = 5,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        grad_clip_norm: float = 0.0,
        compile_newtonschulz: bool = False,
    ):
        groups = split_parameters(model)
        self.momentum = momentum
        self.momentum_warmup_start = momentum_warmup_start
        self.momentum_warmup_steps = momentum_warmup_steps

        def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
            return torch.optim.Adam(
                [{"params": params, "lr": lr, "base_lr": lr}],
                betas=(beta1, beta2),
                eps=eps,
                fused=fused_supported(params) or None,
            )

        optimizers: dict[str, torch.optim.Optimizer] = {"embed": adam(groups.embed, embed_lr)}
        if groups.head:
            optimizers["head"] = adam(groups.head, head_lr)
        self.muon = Muon(
            groups.matrix,
            lr=matrix_lr,
            momentum=momentum,
            backend_steps=backend_steps,
            compile_newtonschulz=compile_newtonschulz,
        )
        for group in self.muon.param_groups:
            group["base_lr"] = matrix_lr
        optimizers["matrix"] = self.muon
        optimizers["scalar"] = adam(groups.scalar, scalar_lr)
        super().__init__(optimizers, model, grad_clip_norm)

    def muon_momentum(self, step: int) -> float:
        if self.momentum_warmup_steps <= 0:
            return self.momentum
        frac = min(step / self.momentum_warmup_steps, 1.0)
        return (1 - frac) * self.momentum_warmup_start + frac * self.momentum

    def prepare_step(self, step: int, lr_scale: float) -> None:
        super().prepare_step(step, lr_scale)
        momentum = self.muon_momentum(step)
        for group in self.muon.param_groups:
            group["momentum"] = momentum
