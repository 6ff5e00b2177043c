"""speedrun's Hydra launchers: `hydra/launcher=slurm` (slurm.py) and `hydra/launcher=parallel` (parallel.py).

Hydra instantiates launchers only from modules under the `hydra_plugins` namespace package, and
imports every module here at start-up, so neither imports its optional plugin before a sweep starts.
"""
