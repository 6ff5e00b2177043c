"""Models: `GPT` (parameter-golf's), `ModdedGPT` (modded-nanogpt's record #20), `NanochatGPT`; Hydra builds
them from `cfg.model`.

The exports load on first use, so a run of one model does not import the others (modded-nanogpt's
imports FlexAttention, whose torch.compile machinery alone takes a second and a half).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GPT": "speedrun.models.gpt",
    "ModdedGPT": "speedrun.models.modded",
    "NanochatGPT": "speedrun.models.nanochat",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
