"""parameter-golf's optimizers: Muon for the model's matrices, Adam for everything else."""

from __future__ import annotations

import torch

from speedrun.optim.multi import MultiOptimizer, fused_supported, groups_by_role
from speedrun.optim.muon import Muon


class MuonAdam(MultiOptimizer):
    """The reference's optimizer set, over the model's parameter roles (speedrun/models/protocol.py):
    Adam on `embed` (embed_lr when the embedding is also the head, the reference's TIED_EMBED_LR;
    untied_embed_lr when the model has a `head` role, its EMBED_LR), Adam on `head` (head_lr), Muon on `matrix` (matrix_lr, its momentum warmed up linearly from
    momentum_warmup_start over momentum_warmup_steps), Adam on `scalar` (scalar_lr).

    Options the reference does not use (their defaults reproduce it): `nesterov` (Muon's look-ahead
    momentum) and Muon's decoupled `weight_decay`, cautious with `cautious_weight_decay`.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        matrix_lr: float = 0.04,
        scalar_lr: float = 0.04,
        embed_lr: float = 0.05,
        untied_embed_lr: float = 0.6,
        head_lr: float = 0.008,
        momentum: float = 0.95,
        momentum_warmup_start: float = 0.85,
        momentum_warmup_steps: int = 500,
        backend_steps: int = 5,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        grad_clip_norm: float = 0.0,
        compile_newtonschulz: bool | str = "auto",
        nesterov: bool = True,
        weight_decay: float = 0.0,
        cautious_weight_decay: bool = False,
    ):
        roles = groups_by_role(param_groups)

        def adam(role: str, lr: float) -> torch.optim.Adam:
            params = roles[role]
            return torch.optim.Adam(
                [{"name": role, "params": params, "lr": lr}],
                betas=(beta1, beta2),
                eps=eps,
                fused=fused_supported(params) or None,
            )

        if compile_newtonschulz == "auto":
            # The reference compiles Newton-Schulz with the model, on CUDA; on CPU it only costs time.
            compile_newtonschulz = any(p.is_cuda for p in roles.get("matrix", []))
        builders = {
            "embed": lambda: adam("embed", untied_embed_lr if roles.get("head") else embed_lr),
            "head": lambda: adam("head", head_lr),
            "matrix": lambda: Muon(
                [{"name": "matrix", "params": roles["matrix"]}],
                lr=matrix_lr,
                momentum=momentum,
                momentum_warmup_start=momentum_warmup_start,
                momentum_warmup_steps=momentum_warmup_steps,
                backend_steps=backend_steps,
                nesterov=nesterov,
                compile_newtonschulz=bool(compile_newtonschulz),
                weight_decay=weight_decay,
                cautious_weight_decay=cautious_weight_decay,
            ),
            "scalar": lambda: adam("scalar", scalar_lr),
        }
        # A role the model does not have (an untied head, say) gets no optimizer.
        optimizers = {role: build() for role, build in builders.items() if roles.get(role)}
        super().__init__(optimizers, grad_clip_norm)
