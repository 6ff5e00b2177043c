"""OmegaConf resolvers used by conf/config.yaml to name output folders."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import OmegaConf

MAX_NAME_CHARS = 80
# Past this even the short form is cut (file systems allow 255 bytes per name).
MAX_SHORT_NAME_CHARS = 160
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
# Items of an override summary are `key=value` joined by `,`; a `,` inside a value (`tags=[a,b]`) is not
# followed by a key and `=`.
_ITEM_SEP = re.compile(r",(?=[+~]?[\w.@/-]+=)")


def safe_name(text: str, swept: object = None) -> str:
    """A folder name for a job from its override summary (Hydra's `override_dirname`).

    Items whose key the sweep preset sweeps (`swept`, the keys of `hydra.sweeper.params`) come first,
    so that the values telling the jobs apart stay in view. `/` and other characters unsafe in a file
    name become `_`. Every value stays in the name; when the whole is longer than MAX_NAME_CHARS, keys
    are shortened to their last part (`optimizer.matrix_lr=0.02` -> `matrix_lr=0.02`, unless two keys
    share it). Only past MAX_SHORT_NAME_CHARS are overrides the preset does not sweep cut (between two
    items, never a value in the middle), and the name then ends with a short hash of the whole; a
    swept value is never cut, so no two jobs of a sweep differ only by that hash.
    """
    first = [str(key).lstrip("+~") for key in (swept or {})]  # `+ablate` sweeps the key `ablate`

    def key_of(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    def rank(item: str) -> int:
        return first.index(key_of(item)) if key_of(item) in first else len(first)

    items = sorted(_ITEM_SEP.split(str(text)) if text else [], key=rank)  # stable: the rest stay sorted
    name = _join(items)
    if len(name) <= MAX_NAME_CHARS:
        return name
    items = _short_keys(items)
    name = _join(items)
    if len(name) <= MAX_SHORT_NAME_CHARS:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    kept = [item for item in items if rank(item) < len(first)]
    for item in items[len(kept) :]:
        if len(_join([*kept, item])) + len(digest) + 1 > MAX_SHORT_NAME_CHARS:
            break
        kept.append(item)
    return f"{_join(kept)}_{digest}"


def _join(items: list[str]) -> str:
    return ",".join(_UNSAFE.sub("_", item) for item in items).strip("._") or "job"


def _short_keys(items: list[str]) -> list[str]:
    """`a.b.key=value` -> `key=value` where no other item's key ends the same way."""
    last = [item.split("=", 1)[0].rsplit(".", 1)[-1] for item in items]
    return [
        f"{short}={item.split('=', 1)[1]}" if last.count(short) == 1 and "=" in item else item
        for item, short in zip(items, last, strict=True)
    ]


def claim_dir(parent: str, name: str) -> str:
    """`parent/name`, or `parent/name-2`, `-3`, ... if a run or sweep started in the same second owns it.

    The folder is created here (atomically, by mkdir) so two processes racing cannot both claim it.
    Cached per process by OmegaConf, so every job of one sweep gets the same answer.
    """
    for attempt in range(1, 1000):
        candidate = Path(parent) / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return str(candidate)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not claim a folder under {parent}/{name}")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("safe_name"):
        OmegaConf.register_new_resolver("safe_name", safe_name)
    if not OmegaConf.has_resolver("claim_dir"):
        OmegaConf.register_new_resolver("claim_dir", claim_dir, use_cache=True)
