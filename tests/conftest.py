"""Shared test helpers: the embedded corpus (built once per machine) and a real-CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.fixtures_data"]

# A job small enough for a few seconds on one CPU core: 2 layers x 64, 64-token sequences.
TINY = [
    "model=gpt_tiny",
    "data.seq_len=64",
    "data.val_tokens=8192",
    "trainer.train_batch_tokens=1024",
    "trainer.val_batch_tokens=4096",
    "trainer.log_every=5",
    "trainer.max_wallclock_seconds=0",  # step-based horizons only: results must not depend on load
    "logger=none",
]


def cli_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def run_train(
    run_dir: Path, *overrides: str, timeout: float = 240, check: bool = True, env: dict | None = None
):
    """`python -m speedrun.train` as a user runs it, writing into run_dir."""
    cmd = [sys.executable, "-m", "speedrun.train", *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def corpus(stdlib_corpus_dir: Path) -> Path:
    """Build the embedded corpus before any CLI test, so no test pays for it under its timeout."""
    return stdlib_corpus_dir


# The run `trained_run` makes: checkpoints, an artifact, samples and sliding-window validation (stride 32).
TRAINED_RUN = [
    "trainer.max_steps=40",
    "trainer.val_every=20",
    "trainer.val_stride=32",
    "trainer.sample_every=20",
    "trainer.sample_tokens=8",
    "trainer.checkpoint_every=20",
    "logger=wandb",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A tiny GPT trained for 40 steps through the CLI (about 20 s), shared by the evaluation and sampling
    tests: a model that has learnt something, its end checkpoint, its artifact and its samples."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_train(run_dir, *TRAINED_RUN)
    return run_dir
