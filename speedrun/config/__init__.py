"""Config schemas and validation (no torch import here: config errors must be instant)."""

from speedrun.config.schema import Config, TrainerConfig, register_configs
from speedrun.config.validate import ConfigError, validate_config

__all__ = ["Config", "ConfigError", "TrainerConfig", "register_configs", "validate_config"]
