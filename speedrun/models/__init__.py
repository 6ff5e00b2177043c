"""Models. `GPT` is parameter-golf's architecture, `ModdedGPT` modded-nanogpt's record #20; Hydra builds
them from `cfg.model`."""

from speedrun.models.gpt import GPT
from speedrun.models.modded import ModdedGPT

__all__ = ["GPT", "ModdedGPT"]
