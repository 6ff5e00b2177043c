"""Checkpoints: atomic to write, safe to load, and the newest valid one found after a crash.

A checkpoint holds everything needed to continue bit for bit: model, optimizers, step, training
time used, the data-stream position, every RNG state and the config. It is written to a temporary
file, fsync'ed and renamed, so a crash mid-write never replaces a good checkpoint with a torn one.
Loading checks the zip container's CRC32s first (torch.load alone accepts flipped bits in tensor
data), then uses `torch.load(weights_only=True)`, so a checkpoint file can never run code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import zipfile
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
    "trainer.stop_at_target",
    "trainer.target_metric",
    "trainer.target_value",
    "trainer.target_margin",
    "trainer.target_val_every",
    "trainer.sample_every",
    "trainer.sample_tokens",
    "trainer.sample_temperature",
    "trainer.sample_prompts",
    "logger.",
    # The track a run is checked against, and the format it exports at the end, change no step.
    "rules",
    "rules.",
    "export.",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


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
    """`folder/step_NNNNNNNNN.pt`, newest first; a corrupt one is renamed `*.corrupt` when skipped."""

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
                writer = _ErrorKeepingWriter(f)
                try:
                    torch.save(state, writer)
                except RuntimeError as exc:
                    if writer.error is None:
                        raise
                    raise writer.error from exc
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.folder)  # the rename itself must survive a power cut
        for old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, *, mmap: bool = False) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads. A corrupt one is renamed `<name>.corrupt` (kept for
        inspection, but out of the rotation and of later resumes) with a warning."""
        for path in self.paths():
            try:
                return load_checkpoint(path, mmap=mmap), path
            except CheckpointError as exc:
                aside = path.with_name(path.name + ".corrupt")
                with contextlib.suppress(FileNotFoundError):  # another rank of this job set it aside first
                    os.replace(path, aside)
                log.warning("warning: %s; moved it to %s and trying the previous checkpoint", exc, aside.name)
        return None


class _ErrorKeepingWriter:
    """torch.save turns a failed write into a bare RuntimeError ("unexpected pos"); this keeps the
    OSError (disk full, file too large, ...) so the warning can say what really happened."""

    def __init__(self, file) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict:
    """Load a checkpoint written by `CheckpointManager.save`, refusing torn, corrupt or foreign
    files with a CheckpointError. `mmap=True` reads tensors lazily (enough to read the config)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check trainer.resume")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({exc})") from None
    if bad_member is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (CRC mismatch in {bad_member})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data, which could run code "
            f"on load; refused ({reason})"
        ) from None
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "config"} <= state.keys():
        raise CheckpointError(
            f"checkpoint {path} is not a speedrun checkpoint (missing model/optimizer/step)"
        )
    return state


def select_checkpoint(
    manager: CheckpointManager,
    resume: str,
    config: dict,
    force: bool,
    *,
    mmap: bool = False,
    warn: bool = True,
) -> tuple[dict, Path] | None:
    """The checkpoint a run continues from, or None to start afresh.

    resume="auto": the newest valid checkpoint in the run's own folder; "never": none (refused
    when the folder already holds checkpoints, which a fresh run would mix with its own); anything
    else: a checkpoint file, or a run/checkpoints folder whose newest valid one is used. A config
    that changes the run is refused, naming the keys, unless `force` (then `warn` says so in the log).
    """
    if resume == "never":
        if existing := manager.paths():
            raise CheckpointError(
                f"{manager.folder} already holds checkpoints (newest {existing[0].name}) and "
                "trainer.resume=never would mix a fresh run into them; use a new run folder, "
                "delete that folder, or set trainer.resume=auto to continue"
            )
        return None
    if resume == "auto":
        found = manager.load_latest(mmap=mmap)
    else:
        target = Path(resume).expanduser()
        if target.is_dir():
            folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
            found = CheckpointManager(folder).load_latest(mmap=mmap)
            if found is None:
                raise CheckpointError(f"trainer.resume={resume}: no valid checkpoint in {folder}")
        else:
            found = load_checkpoint(target, mmap=mmap), target
    if found is None:
        return None
    state, path = found
    differences = config_differences(state.get("config") or {}, config)
    if differences and not force:
        raise CheckpointError(
            f"checkpoint {path} was made with a different config ({'; '.join(differences)}); "
            "resume with the same config, use a new run folder, or set trainer.resume_force=true"
        )
    if differences and warn:
        log.warning("warning: resuming %s despite config changes (%s)", path, "; ".join(differences))
    return state, path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resumable_change(key: str) -> bool:
    """Whether a resumed run may change this dotted key (RESUMABLE_CHANGES; `logger.` also covers the
    whole group, so `logger=none` may resume a run that logged to wandb)."""
    return any(
        key == p or (p.endswith(".") and (key.startswith(p) or key == p[:-1])) for p in RESUMABLE_CHANGES
    )


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ in a way that changes the run (see RESUMABLE_CHANGES)."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k) and not resumable_change(k)
    ]
