"""Provenance: which code, environment, machine, command and data produced a run.

Collected once, by rank 0, when the job starts; it goes to summary.json's `provenance` block, the
head of train.log and the wandb config (never into the config checkpoints compare on resume). Every
field is cheap: git runs with a short timeout, the data is identified by its listing rather than by
reading gigabytes of shards, and anything that cannot be found is null rather than an error.

| field                  | what it is                                                                      |
| ---------------------- | ------------------------------------------------------------------------------- |
| `git_commit`           | `git rev-parse HEAD` of the checkout the speedrun package was imported from (null when it is not a checkout: an installed package) |
| `git_dirty`            | tracked files differ from that commit (`git diff HEAD` is not empty)            |
| `git_diff_sha256`      | sha256 of `git diff HEAD --binary` (null when clean)                            |
| `speedrun_version`     | the installed distribution's version                                            |
| `python`, `torch`      | their versions                                                                  |
| `cuda`, `nccl`         | the CUDA torch was built with, NCCL's version (null without CUDA)               |
| `gpu_name`, `gpu_count`| the device the ranks trained on and how many (null and 0 on CPU)                |
| `hostname`             | rank 0's host                                                                   |
| `command`              | the command line as this process received it                                    |
| `data_manifest_sha256` | sha256 over each shard folder's `manifest.json` (when it has one) and the name and size of every shard |
| `data_shards`          | how many shards (train and validation) the data source lists                    |
| `tokenizer_sha256`     | sha256 of the tokenizer file (or the tokenizer's own fingerprint when it is not a file) |
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from speedrun.data.tokenizer import file_sha256

GIT_TIMEOUT_S = 5.0
PROVENANCE_FIELDS = (
    "git_commit", "git_dirty", "git_diff_sha256", "speedrun_version", "python", "torch", "cuda", "nccl",
    "gpu_name", "gpu_count", "hostname", "command", "data_manifest_sha256", "data_shards", "tokenizer_sha256",
)  # fmt: skip


def package_checkout() -> Path:
    """The folder holding the imported speedrun package: a checkout's root when it runs from one."""
    return Path(__file__).resolve().parent.parent


def _git(checkout: Path, *args: str) -> bytes | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(checkout: Path) -> dict:
    """`git_commit`, `git_dirty` and `git_diff_sha256` of `checkout`; nulls when it is not the root of
    a git work tree (an installed package inside some other repository is not that repository's code)."""
    nothing = {"git_commit": None, "git_dirty": None, "git_diff_sha256": None}
    top = _git(checkout, "rev-parse", "--show-toplevel")
    if top is None or Path(top.decode().strip()).resolve() != checkout.resolve():
        return nothing
    commit = _git(checkout, "rev-parse", "HEAD")
    # --no-ext-diff / --no-textconv: the user's diff drivers must not change what is hashed.
    diff = _git(checkout, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv")
    if commit is None or diff is None:
        return nothing
    return {
        "git_commit": commit.decode().strip(),
        "git_dirty": bool(diff),
        "git_diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `python -m speedrun.train ...` when run as a module (argv[0] is then the
    module's file), else the program and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]) if argv else Path("")
    if program.name == "train.py" and program.parent.name == "speedrun":
        return shlex.join(["python", "-m", "speedrun.train", *argv[1:]])
    return shlex.join([program.name, *argv[1:]] if argv else [])


def _listed(data, method: str) -> list[Path]:
    """What a data source's `train_files` / `val_files` lists; nothing for one without them (a data
    source from outside speedrun need not list files)."""
    lister = getattr(data, method, None)
    return [Path(f) for f in lister()] if callable(lister) else []


def data_identity(data) -> dict:
    """`data_manifest_sha256`, `data_shards` and `tokenizer_sha256` of a data source (see the table)."""
    shards = sorted({*_listed(data, "train_files"), *_listed(data, "val_files")})
    digest = hashlib.sha256()
    for folder in sorted({shard.parent for shard in shards}):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            digest.update(manifest.read_bytes())
    for shard in shards:
        digest.update(f"{shard.name}\t{shard.stat().st_size}\n".encode())
    return {
        "data_manifest_sha256": digest.hexdigest() if shards else None,
        "data_shards": len(shards),
        "tokenizer_sha256": _tokenizer_sha256(data),
    }


def _tokenizer_sha256(data) -> str | None:
    spec = data.tokenizer_path() if callable(getattr(data, "tokenizer_path", None)) else None
    if spec is not None and Path(spec).is_file():
        return file_sha256(Path(spec))
    # A tokenizer that is not a file (a built-in such as gpt2): its own fingerprint, where it has one.
    tokenizer = data.tokenizer() if callable(getattr(data, "tokenizer", None)) else None
    fingerprint = getattr(tokenizer, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def _speedrun_version() -> str | None:
    try:
        return metadata.version("speedrun")
    except metadata.PackageNotFoundError:
        return None


def environment(device, world_size: int) -> dict:
    """Versions, the GPU the ranks use (`device`: rank 0's torch device) and the host."""
    import torch

    on_gpu = device.type == "cuda"
    nccl = None
    if on_gpu and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()  # a tuple (2, 21, 5) in current torch, an int in old ones
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {
        "speedrun_version": _speedrun_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "gpu_name": torch.cuda.get_device_name(device) if on_gpu else None,
        "gpu_count": world_size if on_gpu else 0,
        "hostname": socket.gethostname(),
    }


def collect_provenance(data, device, world_size: int) -> dict:
    """The whole `provenance` block, keys in PROVENANCE_FIELDS order."""
    found = {
        **git_state(package_checkout()),
        **environment(device, world_size),
        "command": command_line(),
        **data_identity(data),
    }
    return {key: found[key] for key in PROVENANCE_FIELDS}


def provenance_lines(provenance: dict) -> list[str]:
    """The log header: three lines a reader can check a run against."""
    p = provenance
    commit = p["git_commit"] or "not a git checkout"
    if p["git_dirty"]:
        commit += f" (dirty, diff sha256 {p['git_diff_sha256'][:12]})"
    gpu = f"{p['gpu_count']}x{p['gpu_name']}" if p["gpu_name"] else "cpu"
    return [
        f"provenance: git {commit} | speedrun {p['speedrun_version']} | python {p['python']} | "
        f"torch {p['torch']} | cuda {p['cuda']} | nccl {p['nccl']} | {gpu} | host {p['hostname']}",
        f"data: {p['data_shards']} shards, manifest sha256 {p['data_manifest_sha256']}, "
        f"tokenizer sha256 {p['tokenizer_sha256']}",
        f"command: {p['command']}",
    ]
