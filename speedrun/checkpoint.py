"""Checkpoints: atomic to write, safe to load, and the newest valid one found after a crash.

A checkpoint holds everything needed to continue bit for bit: model, optimizers, step, training
time used, the data-stream position, every RNG state and the config. It is written to a temporary
file, fsync'ed and renamed, so a crash mid-write never replaces a good checkpoint with a torn one,
and loaded with `torch.load(weights_only=True)`, so a checkpoint file can never run code.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("speedrun")

_NAME = re.compile(r"^step_(\d{9})\.pt$")

# Config keys a resumed run may change: they affect logging, cadence and where it runs, not the
# numbers it computes. Any other difference is refused unless trainer.resume_force=true.
RESUMABLE_CHANGES = (
    "trainer.max_steps",
    "trainer.max_wallclock_seconds",
    "trainer.val_every",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.checkpoint_every_seconds",
    "trainer.keep_checkpoints",
    "trainer.resume",
    "trainer.resume_force",
    "trainer.nproc_per_node",
    "trainer.micro_batch_tokens",
    "trainer.compile",
    "trainer.warmup_steps",
    "trainer.export",
    "trainer.max_loss",
    "trainer.device",
    "logger.",
)


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _to_safe(state)


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_safe(obj):
    """Tuples and numpy arrays to lists/tensors, so `weights_only=True` can load the result."""
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class CheckpointManager:
    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(keep, 1)

    def paths(self) -> list[Path]:
        """Checkpoints in this folder, newest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict) -> Path:
        """Write atomically, then drop all but the newest `keep`. Raises on failure, leaving the
        previous checkpoints untouched."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{state['step']:09d}.pt"
        tmp = self.folder / f".{path.name}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; a corrupt one is skipped with a warning."""
        for path in self.paths():
            try:
                return load_checkpoint(path), path
            except CheckpointError as exc:
                log.warning("warning: %s; trying the previous checkpoint", exc)
        return None


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} is not a speedrun checkpoint")
    return state


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ in a way that changes the run (see RESUMABLE_CHANGES)."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k)
        and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)
    ]
