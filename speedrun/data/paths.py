"""Paths as the user meant them, and the per-user cache folder speedrun builds and fetches into.

The cache is `$SPEEDRUN_CACHE` when set, else `$XDG_CACHE_HOME/speedrun`, else `~/.cache/speedrun` (the
XDG base directory convention); never the source tree, since an installed package has no checkout to
write into, and one cache serves every checkout and every run on the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from speedrun.data import DataError


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths mean the directory the user launched from, not Hydra's run folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(os.environ.get("SPEEDRUN_ORIG_CWD", os.getcwd())) / path


def cache_root() -> Path:
    """The cache folder, created if needed; one that cannot be used is one error naming where it came from."""
    if configured := os.environ.get("SPEEDRUN_CACHE"):
        root, source = resolve_path(configured), f"SPEEDRUN_CACHE={configured}"
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        root, source = resolve_path(xdg) / "speedrun", f"XDG_CACHE_HOME={xdg}"
    else:
        root, source = Path.home() / ".cache" / "speedrun", "the default cache folder"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DataError(
            f"{source}: cannot use {root} as speedrun's cache folder ({reason}); "
            "point SPEEDRUN_CACHE at a writable folder"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise DataError(
            f"{source}: the cache folder {root} is not writable; point SPEEDRUN_CACHE at a writable folder"
        )
    return root
