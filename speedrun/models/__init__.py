"""Models: `GPT` (parameter-golf's), `ModdedGPT` (modded-nanogpt's record #20), `NanochatGPT`; Hydra builds
them from `cfg.model`.

The exports load on first use, so a run of one model does not import the others (modded-nanogpt's
imports FlexAttention, whose torch.compile machinery alone takes a second and a half).
"""

from __future__ import annotations

from speedrun.lazy import lazy_exports

_EXPORTS = {
    "GPT": "speedrun.models.gpt",
    "ModdedGPT": "speedrun.models.modded",
    "NanochatGPT": "speedrun.models.nanochat",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
