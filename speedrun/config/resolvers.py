"""OmegaConf resolvers used by conf/config.yaml to name output folders."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import OmegaConf

MAX_NAME_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
# Items of an override summary are `key=value` joined by `,`; a `,` inside a value (`tags=[a,b]`) is not
# followed by a key and `=`.
_ITEM_SEP = re.compile(r",(?=[+~]?[\w.@/-]+=)")


def safe_name(text: str, swept: object = None) -> str:
    """A folder name for a job from its override summary (Hydra's `override_dirname`).

    Items whose key the sweep preset sweeps (`swept`, the keys of `hydra.sweeper.params`) come first,
    so that the values telling the jobs apart stay in view. `/` and other characters unsafe in a file
    name become `_`. A name longer than MAX_NAME_CHARS is cut between two items (a value cut in the
    middle, `data.seq_len=1` for 128, would read as another value) and ends with a short hash of the
    whole, so that two long names never collide.
    """
    first = [str(key).lstrip("+~") for key in (swept or {})]  # `+ablate` sweeps the key `ablate`

    def rank(item: str) -> int:
        key = item.split("=", 1)[0].lstrip("+~")
        return first.index(key) if key in first else len(first)

    items = sorted(_ITEM_SEP.split(str(text)) if text else [], key=rank)  # stable: the rest stay sorted
    items = [_UNSAFE.sub("_", item) for item in items]
    name = ",".join(items).strip("._") or "job"
    if len(name) <= MAX_NAME_CHARS:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    budget = MAX_NAME_CHARS - len(digest) - 1
    head = name[:budget]
    # The longest run of whole items that fits; a first item longer than the budget is cut anyway.
    whole = ""
    for item in items:
        candidate = f"{whole},{item}" if whole else item
        if len(candidate.strip("._")) > budget:
            break
        whole = candidate
    return f"{whole.strip('._') or head}_{digest}"


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
