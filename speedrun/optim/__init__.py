"""Optimizer sets the trainer drives through one interface (see OptimizerSet)."""

from speedrun.optim.adamw import AdamW
from speedrun.optim.muon import Muon
from speedrun.optim.muon_adam import MuonAdam

__all__ = ["AdamW", "Muon", "MuonAdam"]
