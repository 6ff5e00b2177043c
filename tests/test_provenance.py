"""Provenance: a run from a git checkout records that checkout's commit, its dirt, the environment, the
command and the data, in summary.json, train.log's header and the wandb config."""

from __future__ import annotations

import hashlib
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedrun.provenance import PROVENANCE_FIELDS, command_line, data_identity, git_state
from speedrun.sinks.wandb_reader import read_offline_run
from tests.conftest import REPO, TINY, cli_env, read_summary


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A throwaway git repository holding this working tree as it is now (tracked files and new ones
    git does not ignore), committed."""
    root = tmp_path_factory.mktemp("checkout")
    for name in git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        source = REPO / name
        if name and (source.exists() or source.is_symlink()):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name, follow_symlinks=False)
    git(root, "init", "--quiet")
    git(root, "add", "--all")
    git(root, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "--quiet", "-m", "copy")
    return root


@pytest.mark.usefixtures("corpus")
def test_a_run_records_the_checkout_environment_command_and_data(checkout, corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=2", "trainer.val_every=0", "trainer.export=false", "logger=wandb",
            f"data.cache_dir={corpus}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    # From the checkout's folder, `python -m` imports the checkout's speedrun, not this one.
    proc = subprocess.run([sys.executable, "-m", "speedrun.train", *args], cwd=checkout, env=cli_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(run_dir)
    provenance = summary["provenance"]
    assert tuple(provenance) == PROVENANCE_FIELDS

    assert provenance["git_commit"] == git(checkout, "rev-parse", "HEAD").strip()
    assert provenance["git_commit"] != git(REPO, "rev-parse", "HEAD").strip()  # the copy's own commit
    assert provenance["git_dirty"] is False and provenance["git_diff_sha256"] is None
    assert provenance["python"] == platform.python_version() and provenance["torch"] == torch.__version__
    assert (provenance["cuda"], provenance["nccl"], provenance["gpu_name"], provenance["gpu_count"]) == (
        torch.version.cuda, None, None, 0,
    )  # fmt: skip
    assert provenance["hostname"] == socket.gethostname()
    assert provenance["speedrun_version"] == "0.1.0"
    assert provenance["command"] == "python -m speedrun.train " + " ".join(args)

    shards = sorted(corpus.glob("*.bin"))
    listing = "".join(f"{s.name}\t{s.stat().st_size}\n" for s in shards).encode()
    manifest = (corpus / "manifest.json").read_bytes()
    assert provenance["data_shards"] == len(shards)
    assert provenance["data_manifest_sha256"] == hashlib.sha256(manifest + listing).hexdigest()
    tokenizer = next(corpus.glob("*.model"))
    assert provenance["tokenizer_sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()

    assert summary["rules"] is None  # rules=none, the default
    log = (run_dir / "train.log").read_text()
    assert f"provenance: git {provenance['git_commit']} | speedrun 0.1.0" in log
    assert f"command: {provenance['command']}" in log
    assert read_offline_run(run_dir)["config"]["provenance"] == provenance


def test_the_dirty_flag_follows_the_tracked_files(checkout):
    clean = git_state(checkout)
    assert clean == {"git_commit": git(checkout, "rev-parse", "HEAD").strip(), "git_dirty": False,
                     "git_diff_sha256": None}  # fmt: skip
    readme = checkout / "README.md"
    original = readme.read_bytes()
    try:
        readme.write_bytes(original + b"\nan uncommitted line\n")
        dirty = git_state(checkout)
        diff = subprocess.run(["git", "-C", str(checkout), "diff", "HEAD", "--binary"], capture_output=True,
                              check=True).stdout  # fmt: skip
        assert dirty["git_commit"] == clean["git_commit"] and dirty["git_dirty"] is True
        assert dirty["git_diff_sha256"] == hashlib.sha256(diff).hexdigest()
        (checkout / "untracked.txt").write_text("not part of the code")
        assert (
            git_state(checkout)["git_diff_sha256"] == dirty["git_diff_sha256"]
        )  # untracked files do not count
    finally:
        readme.write_bytes(original)
        (checkout / "untracked.txt").unlink(missing_ok=True)
    assert git_state(checkout) == clean


def test_outside_a_checkout_the_git_fields_are_null(checkout, tmp_path):
    nothing = {"git_commit": None, "git_dirty": None, "git_diff_sha256": None}
    assert git_state(tmp_path) == nothing  # no repository at all
    # A package folder inside some other repository (an install under a project's .venv) is not its code.
    assert git_state(checkout / "speedrun") == nothing


def test_the_command_is_recorded_as_typed():
    assert (
        command_line(["/x/speedrun/train.py", "a=1", "b=two words"])
        == "python -m speedrun.train a=1 'b=two words'"
    )
    assert command_line(["/venv/bin/speedrun-train", "-m", "seed=1,2"]) == "speedrun-train -m seed=1,2"


def test_a_data_source_that_lists_no_files_has_null_hashes():
    """A data source from outside speedrun need not have train_files / tokenizer_path: nulls, no error."""
    assert data_identity(object()) == {
        "data_manifest_sha256": None,
        "data_shards": 0,
        "tokenizer_sha256": None,
    }
