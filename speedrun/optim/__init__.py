"""Optimizers. Each is built from the model's parameter groups (speedrun.models.protocol), so any
torch optimizer works too: `optimizer._target_: torch.optim.AdamW` with `_partial_: true`.

The exports load on first use, so a run imports only the optimizer it uses.
"""

from __future__ import annotations

from speedrun.lazy import lazy_exports

_EXPORTS = {
    "AdamW": "speedrun.optim.adamw",
    "BatchedMuon": "speedrun.optim.batched_muon",
    "ModdedMuonAdam": "speedrun.optim.modded",
    "MultiOptimizer": "speedrun.optim.multi",
    "Muon": "speedrun.optim.muon",
    "MuonAdam": "speedrun.optim.muon_adam",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
