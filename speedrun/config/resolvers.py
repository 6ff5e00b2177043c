"""OmegaConf resolvers used by conf/config.yaml to name output folders."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import OmegaConf

MAX_NAME_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def safe_name(text: str) -> str:
    """A folder-name-safe version of an override summary: `/` and friends become `_`; a long
    summary is cut and given a short hash so two long summaries never collide."""
    name = _UNSAFE.sub("_", str(text)).strip("._") or "job"
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_CHARS - 9]}_{digest}"
    return name


def claim_dir(parent: str, name: str) -> str:
    """`parent/name`, or `parent/name-2`, `-3`, ... if a sweep started in the same second owns it.

    The folder is created here (atomically, by mkdir) so two sweeps racing cannot both claim it.
    Cached per process by OmegaConf, so every job of one sweep gets the same answer.
    """
    for attempt in range(1, 1000):
        candidate = Path(parent) / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return str(candidate)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not claim a sweep folder under {parent}/{name}")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("safe_name"):
        OmegaConf.register_new_resolver("safe_name", safe_name)
    if not OmegaConf.has_resolver("claim_dir"):
        OmegaConf.register_new_resolver("claim_dir", claim_dir, use_cache=True)
