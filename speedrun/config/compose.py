"""The composed config from Python: `speedrun.config.compose(["model=pg_9x512"])`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from speedrun.config.resolvers import register_resolvers
from speedrun.config.schema import register_configs

# The config tree ships inside the package (package data), so an installed speedrun finds it too.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The config `python -m speedrun.train OVERRIDES` would run, without Hydra's own `hydra:` node.

    Works whether or not a Hydra app is already initialised in this process (it uses its own
    temporary initialisation and leaves the global state as it found it).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_resolvers()
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:  # initialize_config_dir refuses to nest; an app's own Hydra state comes back after
        previous = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="speedrun"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        if was_initialized:
            GlobalHydra.instance().initialize(previous)
