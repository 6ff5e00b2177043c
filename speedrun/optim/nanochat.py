"""nanochat's optimizer set (its `MuonAdamW` with the settings of `scripts/base_train.py`, karpathy/nanochat
07c4dd4), over the model's parameter roles (speedrun/models/protocol.py):

- AdamW (betas 0.8/0.95, eps 1e-10, no weight decay) on the `head` (head_lr), the `embed` role
  (embed_lr: token and value embeddings) and the `scalar` role (scalar_lr; nanochat's residual lambdas
  at resid_lr_scale x that, its x0 lambdas with beta1 = x0_beta1);
- nanochat's Muon (speedrun/optim/nanochat_muon.py) on the `matrix` role (matrix_lr), with cautious
  weight decay and its momentum warm-up.

Scalings nanochat applies to the tuned values (tuned for a 768-wide, depth-12 model at 2^19 tokens
per step):
- head and embedding LRs x (width / 768)^-0.5, the width being the head's input size (the
  embedding's for a tied model): read from the parameters, so it always matches the model built;
- every LR x sqrt(batch_tokens / 2^19) (AdamW's usual square-root rule, assumed for Muon too);
- Muon's weight decay x (12 / depth)^2 (nanochat found it scales as 1/width², i.e. 1/depth² at a fixed
  aspect ratio), then decayed linearly to 0 over the run.
`depth` and `batch_tokens` are config keys; optimizer/nanochat.yaml sets them from the model and trainer.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from speedrun.optim.multi import MultiOptimizer, fused_supported, groups_by_role
from speedrun.optim.nanochat_muon import NanochatMuon

log = logging.getLogger("speedrun")

REFERENCE_WIDTH = 768
REFERENCE_DEPTH = 12
REFERENCE_BATCH_TOKENS = 2**19
# The attribute a model sets on a `scalar` parameter to pick nanochat's setting for it
# (speedrun/models/nanochat.py sets it on resid_lambdas and x0_lambdas); untagged scalars take scalar_lr.
SCALAR_KIND_ATTRIBUTE = "nanochat_scalar_kind"


def batch_lr_scale(batch_tokens: int) -> float:
    """nanochat's LR multiplier for a batch of `batch_tokens` tokens: sqrt(batch / 2^19)."""
    return (batch_tokens / REFERENCE_BATCH_TOKENS) ** 0.5


def width_lr_scale(width: int) -> float:
    """nanochat's multiplier of the AdamW (head and embedding) LRs: (width / 768)^-0.5."""
    return (width / REFERENCE_WIDTH) ** -0.5


def depth_weight_decay(weight_decay: float, depth: int) -> float:
    """Muon's weight decay at `depth`, from its value tuned at depth 12: x (12 / depth)^2."""
    return weight_decay * (REFERENCE_DEPTH / depth) ** 2


def model_width(roles: dict[str, list[Tensor]]) -> int:
    """The model's width: the head's input size, or the (tied) embedding's."""
    for role in ("head", "embed"):
        if roles.get(role):
            return roles[role][0].shape[-1]
    raise ValueError(
        "the nanochat optimizer needs a model with a `head` or an `embed` parameter to read its width"
    )


class NanochatMuonAdamW(MultiOptimizer):
    """nanochat's AdamW + Muon (see the module docstring); `set_horizon` sets the weight-decay horizon."""

    def __init__(
        self,
        param_groups: list[dict],
        *,
        matrix_lr: float = 0.02,
        embed_lr: float = 0.3,
        head_lr: float = 0.004,
        scalar_lr: float = 0.5,
        resid_lr_scale: float = 0.01,
        x0_beta1: float = 0.96,
        beta1: float = 0.8,
        beta2: float = 0.95,
        eps: float = 1e-10,
        weight_decay: float = 0.2,
        depth: int = 12,
        batch_tokens: int = 524288,
        momentum: float = 0.95,
        momentum_warmup_start: float = 0.85,
        momentum_warmup_steps: int = 300,
        muon_beta2: float = 0.95,
        ns_steps: int = 5,
    ):
        if depth < 1 or batch_tokens < 1:
            raise ValueError(
                f"optimizer.depth={depth} and optimizer.batch_tokens={batch_tokens} must be positive"
            )
        roles = groups_by_role(param_groups)
        batch_scale = batch_lr_scale(batch_tokens)
        width = model_width(roles)
        width_scale = width_lr_scale(width)
        adam_groups = [
            {"name": "head", "params": roles.get("head", []), "lr": head_lr * width_scale * batch_scale},
            {"name": "embed", "params": roles.get("embed", []), "lr": embed_lr * width_scale * batch_scale},
            *_scalar_groups(
                roles.get("scalar", []), scalar_lr * batch_scale, resid_lr_scale, (x0_beta1, beta2)
            ),
        ]
        adam_groups = [group for group in adam_groups if group["params"]]
        adam_params = [p for group in adam_groups for p in group["params"]]
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if adam_groups:
            optimizers["adamw"] = torch.optim.AdamW(
                adam_groups, betas=(beta1, beta2), eps=eps, weight_decay=0.0,
                fused=fused_supported(adam_params) or None,
            )  # fmt: skip
        decay = depth_weight_decay(weight_decay, depth)
        if roles.get("matrix"):
            optimizers["muon"] = NanochatMuon(
                roles["matrix"], lr=matrix_lr * batch_scale, momentum=momentum,
                momentum_warmup_start=momentum_warmup_start, momentum_warmup_steps=momentum_warmup_steps,
                beta2=muon_beta2, weight_decay=decay, ns_steps=ns_steps,
            )  # fmt: skip
        super().__init__(optimizers)
        log.info(
            "nanochat optimizer: head/embed LRs x%.6f (width %d vs %d), all LRs x%.4f (batch %d vs 2^19), "
            "Muon weight decay %.6f (%g at depth 12, depth %d)",
            width_scale, width, REFERENCE_WIDTH, batch_scale, batch_tokens, decay, weight_decay, depth,
        )  # fmt: skip

    def set_horizon(self, max_steps: int | None) -> None:
        """The run's step horizon, over which Muon's weight decay falls to 0 (None: it stays constant)."""
        if "muon" in self.optimizers:
            self.optimizers["muon"].set_horizon(max_steps)
        if not max_steps:
            log.warning("warning: no step horizon (only a wallclock cap): Muon's weight decay stays constant")


def _scalar_groups(
    params: list[Tensor], lr: float, resid_lr_scale: float, x0_betas: tuple[float, float]
) -> list[dict]:
    """nanochat's scalar groups: residual lambdas at a fraction of the LR, x0 lambdas with their own betas."""
    kinds = {"resid": [], "x0": [], None: []}
    for p in params:
        kinds[getattr(p, SCALAR_KIND_ATTRIBUTE, None)].append(p)
    return [
        {"name": "scalar resid", "params": kinds["resid"], "lr": lr * resid_lr_scale},
        {"name": "scalar x0", "params": kinds["x0"], "lr": lr, "betas": x0_betas},
        {"name": "scalar", "params": kinds[None], "lr": lr},
    ]
