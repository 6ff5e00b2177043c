"""Config schemas, composition and validation (no torch import here: config errors must be instant)."""

from speedrun.config.compose import CONF_DIR, compose
from speedrun.config.schema import Config, TrainerConfig, register_configs
from speedrun.config.validate import ConfigError, validate_config

__all__ = [
    "CONF_DIR",
    "Config",
    "ConfigError",
    "TrainerConfig",
    "compose",
    "register_configs",
    "validate_config",
]
