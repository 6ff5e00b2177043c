"""Plain AdamW over the same parameter roles and learning-rate names as MuonAdam: the baseline
that tells you what Muon buys."""

from __future__ import annotations

import torch

from speedrun.optim.multi import MultiOptimizer, fused_supported, groups_by_role


class AdamW(MultiOptimizer):
    """One torch AdamW with a param group per role (embed, head when untied, matrix, scalar).

    Weight decay applies to the matrices only: decaying embeddings, gains and mixes towards zero
    fights their role. The default learning rates are untuned starting points; an untied embedding
    (the model has a `head` role) uses untied_embed_lr, 12x embed_lr as in parameter-golf (0.6 vs
    0.05), since it starts at N(0, 1) rather than the tied head's small init.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        matrix_lr: float = 0.003,
        scalar_lr: float = 0.003,
        embed_lr: float = 0.01,
        untied_embed_lr: float = 0.12,
        head_lr: float = 0.003,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        grad_clip_norm: float = 0.0,
    ):
        roles = groups_by_role(param_groups)
        settings = {
            "embed": (untied_embed_lr if roles.get("head") else embed_lr, 0.0),
            "head": (head_lr, 0.0),
            "matrix": (matrix_lr, weight_decay),
            "scalar": (scalar_lr, 0.0),
        }
        groups = [
            {"name": role, "params": roles[role], "lr": lr, "weight_decay": decay}
            for role, (lr, decay) in settings.items()
            if roles.get(role)
        ]
        params = [p for group in groups for p in group["params"]]
        adamw = torch.optim.AdamW(
            groups, betas=(beta1, beta2), eps=eps, fused=fused_supported(params) or None
        )
        super().__init__({"adamw": adamw}, grad_clip_norm)
