"""Optimizers. Each is built from the model's parameter groups (speedrun.models.protocol), so any
torch optimizer works too: `optimizer._target_: torch.optim.AdamW` with `_partial_: true`."""

from speedrun.optim.adamw import AdamW
from speedrun.optim.batched_muon import BatchedMuon
from speedrun.optim.modded import ModdedMuonAdam
from speedrun.optim.multi import MultiOptimizer
from speedrun.optim.muon import Muon
from speedrun.optim.muon_adam import MuonAdam

__all__ = ["AdamW", "BatchedMuon", "ModdedMuonAdam", "Muon", "MuonAdam", "MultiOptimizer"]
