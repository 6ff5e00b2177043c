"""Models. `GPT` is parameter-golf's architecture; Hydra builds it from `cfg.model`."""

from speedrun.models.gpt import GPT

__all__ = ["GPT"]
