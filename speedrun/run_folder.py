"""A run folder belongs to one run.

- One live process at a time: `RunFolder.lock()` takes an exclusive `flock` on `<folder>/.lock`. The
  kernel drops it when the process ends, however it ends (`kill -9` included), so it never sticks;
  the file itself only says who held it last.
- History is kept: an attempt writes its record (`.hydra/`, `train.log`, later `summary.json`) only
  once it is accepted, i.e. once every check before training has passed. A refused attempt changes
  nothing but `attempts.jsonl`, the log of every attempt with its own outcome and error.
- A stopped run says how to resume it: `resume_command` is the one command that continues it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

LOCK_FILE = ".lock"
ATTEMPTS_FILE = "attempts.jsonl"
# Overrides that pick how a job is launched or swept, not what it computes: a single job's resume
# command leaves them out (it runs the one job again, not the sweep).
NOT_PART_OF_A_JOB = ("sweep", "hydra/sweeper", "hydra/launcher", "hydra.")


class RunFolderBusy(RuntimeError):
    """Another live process is using the folder."""


class LogBuffer(logging.Handler):
    """Keeps this process's log records while an attempt is checked, for train.log once it is accepted."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def attached(self):
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)


def command_line() -> str:
    """How this process was started, as a shell line (`python -m speedrun.train ...` for the entry point)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.name == "train.py" and program.parent.name == "speedrun":
        launcher = ["python", "-m", "speedrun.train"]
    else:
        launcher = [program.name]
    return shlex.join([*launcher, *sys.argv[1:]])


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- one live process

    @contextlib.contextmanager
    def lock(self, what: str = "run"):
        """Hold the folder for the body; RunFolderBusy (naming the holder) if a live process has it.

        Nothing is written to take it (the lock file is created empty once), so a refused attempt
        leaves the folder as it was."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(os.fstat(fd).st_ino)
            os.close(fd)
            raise RunFolderBusy(
                f"{what} folder {self.path} is in use by {holder}; wait for it to end, or choose another "
                f"folder ({'hydra.sweep.dir' if what == 'sweep' else 'hydra.run.dir'}=...)"
            ) from None
        try:
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ---------------------------------------------------------------- what is already there

    def trained_before(self) -> bool:
        """Whether an earlier attempt got as far as training (it logged metrics): its record is a run's
        results, which a later attempt that fails before training must not replace. (The record of an
        attempt that itself failed before training is only that failure: the next one replaces it.)"""
        metrics = self.path / "metrics.jsonl"
        return metrics.is_file() and metrics.stat().st_size > 0

    # ---------------------------------------------------------------- an accepted attempt's record

    def write_hydra_record(self, cfg: DictConfig, hydra_cfg: DictConfig | None, overrides: list[str]) -> None:
        """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, as Hydra itself writes them (its own
        writing is off: `hydra.output_subdir: null`, so that a refused attempt cannot overwrite them)."""
        folder = self.path / ".hydra"
        folder.mkdir(parents=True, exist_ok=True)
        records = {"config.yaml": cfg, "overrides.yaml": OmegaConf.create(list(overrides))}
        if hydra_cfg is not None:
            records["hydra.yaml"] = OmegaConf.create({"hydra": hydra_cfg})
        for name, node in records.items():
            tmp = folder / f".{name}.tmp{os.getpid()}"
            OmegaConf.save(node, tmp)
            os.replace(tmp, folder / name)

    @contextlib.contextmanager
    def train_log(self, earlier: list[logging.LogRecord] = ()):
        """Rank 0's log lines also go to `train.log` (appended: a resumed run continues it) for the body,
        after the `earlier` lines of this attempt (logged while it was checked, before it was accepted)."""
        handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(message)s"))
        for record in earlier:
            handler.handle(record)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()

    def log_attempt(self, started: float, status: str, error: str | None) -> None:
        """One line in attempts.jsonl: when, who, how it ended and with what error."""
        entry = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command_line(),
            "status": status,
            "error": error,
        }
        with open(self.path / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")


def lock_holder(inode: int) -> str:
    """`process PID (its command line)` holding an flock on the file with this inode, from /proc/locks
    (Linux; elsewhere, or for a holder on another machine of a shared file system, "another process")."""
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                pid = fields[4]
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                command = " ".join(shlex.join(a.decode(errors="replace") for a in argv if a).split())
                return f"process {pid} ({command})"
    except OSError:
        pass
    return "another process"


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The one command that continues the run in `run_dir`: the job's own overrides (not the sweep's
    or launcher's), pinned to its folder. Under torchrun, with the same torchrun shape."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(NOT_PART_OF_A_JOB)]
    args = [*kept, f"hydra.run.dir={run_dir.resolve()}"]
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)
    if "TORCHELASTIC_RUN_ID" in os.environ and nodes == 1:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
        launcher = ["torchrun", "--standalone", "--nproc_per_node", per_node, "-m", "speedrun.train"]
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        # Several nodes: the rendezvous flags are the user's (this process cannot see the endpoint).
        return "torchrun <the same rendezvous flags> -m speedrun.train " + shlex.join(args)
    else:
        launcher = ["python", "-m", "speedrun.train"]
    return shlex.join([*launcher, *args])
