"""Optimizers. Each is built from the model's parameter groups (speedrun.models.protocol), so any
torch optimizer works too: `optimizer._target_: torch.optim.AdamW` with `_partial_: true`.

The exports load on first use, so a run imports only the optimizer it uses.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdamW": "speedrun.optim.adamw",
    "BatchedMuon": "speedrun.optim.batched_muon",
    "ModdedMuonAdam": "speedrun.optim.modded",
    "MultiOptimizer": "speedrun.optim.multi",
    "Muon": "speedrun.optim.muon",
    "MuonAdam": "speedrun.optim.muon_adam",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
