"""Make speedrun's config folder composable with nothing but Hydra's own API.

speedrun's YAML options extend typed schemas that live in Hydra's ConfigStore, not in files. Hydra
imports every module under the `hydra_plugins` namespace package while it discovers plugins, before
it reads any config, so registering the schemas here means `initialize_config_dir(...)` + `compose(...)`
on `speedrun/conf` works in a notebook without first calling `speedrun.config.register_configs()`.
"""

from speedrun.config.resolvers import register_resolvers
from speedrun.config.schema import register_configs

register_configs()
register_resolvers()
