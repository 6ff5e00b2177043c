"""modded-nanogpt record #20's optimizers: batched Muon for the matrices, one Adam for the rest."""

from __future__ import annotations

import torch

from speedrun.optim.batched_muon import BatchedMuon
from speedrun.optim.multi import MultiOptimizer, fused_supported, groups_by_role


class ModdedMuonAdam(MultiOptimizer):
    """The record's optimizer set, over the model's parameter roles (speedrun/models/protocol.py).

    One Adam (betas 0.8 / 0.95, eps 1e-10, no weight decay) with a param group per role: `head`
    (head_lr 0.008), `embed` (embed_lr 0.6: the token and value embeddings), `scalar` (scalar_lr 0.04);
    and BatchedMuon on `matrix` (matrix_lr 0.05, momentum 0.95 warmed up from 0.85 over 300 steps).
    The record lowered Adam's eps from 1e-8 to 1e-10; its large embedding LR relies on it.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        matrix_lr: float = 0.05,
        scalar_lr: float = 0.04,
        embed_lr: float = 0.6,
        head_lr: float = 0.008,
        momentum: float = 0.95,
        momentum_warmup_start: float = 0.85,
        momentum_warmup_steps: int = 300,
        backend_steps: int = 5,
        beta1: float = 0.8,
        beta2: float = 0.95,
        eps: float = 1e-10,
        compile_newtonschulz: bool | str = "auto",
    ):
        roles = groups_by_role(param_groups)
        learning_rates = {"head": head_lr, "embed": embed_lr, "scalar": scalar_lr}  # the record's group order
        adam_groups = [
            {"name": role, "params": roles[role], "lr": lr}
            for role, lr in learning_rates.items()
            if roles.get(role)
        ]
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if adam_groups:
            adam_params = [p for group in adam_groups for p in group["params"]]
            optimizers["adam"] = torch.optim.Adam(
                adam_groups, betas=(beta1, beta2), eps=eps, fused=fused_supported(adam_params) or None
            )
        if roles.get("matrix"):
            if compile_newtonschulz == "auto":
                # As the record, on CUDA; on CPU compiling only costs time.
                compile_newtonschulz = any(p.is_cuda for p in roles["matrix"])
            optimizers["muon"] = BatchedMuon(
                [{"name": "matrix", "params": roles["matrix"]}],
                lr=matrix_lr,
                momentum=momentum,
                momentum_warmup_start=momentum_warmup_start,
                momentum_warmup_steps=momentum_warmup_steps,
                backend_steps=backend_steps,
                compile_newtonschulz=bool(compile_newtonschulz),
            )
        super().__init__(optimizers)
