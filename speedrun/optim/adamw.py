"""Plain AdamW over the same parameter groups and learning-rate names as MuonAdam: the baseline
that tells you what Muon buys."""

from __future__ import annotations

import torch
from torch import nn

from speedrun.optim.muon_adam import OptimizerSet, fused_supported, split_parameters


class AdamW(OptimizerSet):
    """One torch AdamW with a param group per role (embed, head when untied, matrix, scalar).

    Weight decay applies to the block matrices only: decaying embeddings, gains and mixes towards
    zero fights their role. The default learning rates are untuned starting points.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        matrix_lr: float = 0.003,
        scalar_lr: float = 0.003,
        embed_lr: float = 0.01,
        head_lr: float = 0.003,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        grad_clip_norm: float = 0.0,
    ):
        groups = split_parameters(model)
        roles = [
            ("embed", groups.embed, embed_lr, 0.0),
            ("head", groups.head, head_lr, 0.0),
            ("matrix", groups.matrix, matrix_lr, weight_decay),
            ("scalar", groups.scalar, scalar_lr, 0.0),
        ]
        param_groups = [
            {"name": name, "params": params, "lr": lr, "base_lr": lr, "weight_decay": decay}
            for name, params, lr, decay in roles
            if params
        ]
        all_params = [p for group in param_groups for p in group["params"]]
        adamw = torch.optim.AdamW(
            param_groups, betas=(beta1, beta2), eps=eps, fused=fused_supported(all_params) or None
        )
        super().__init__({"adamw": adamw}, model, grad_clip_norm)
