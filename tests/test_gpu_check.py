"""`make gpu-check`: on a machine without CUDA, one line and exit 0; bad flags are one `error:` line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, cli_env

GPU_CHECK = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check runs for real")
def test_without_cuda_it_says_so_in_one_line_and_exits_0() -> None:
    proc = subprocess.run(GPU_CHECK, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"gpu-check: no CUDA device here (torch {torch.__version__}); nothing to check"
    ]


def test_make_gpu_check_runs_the_script() -> None:
    # A dry run (-n): it prints what `make gpu-check` runs without running it (nor the install it may need).
    # --no-print-directory: under a parent make (CI's `make test`) make would add Entering/Leaving lines.
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", "gpu-check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "python benchmarks/gpu_check.py" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps 0 must be at least 1"),
        (["--reference", "nowhere.py"], "--reference nowhere.py: no such file"),
    ],
)
def test_a_bad_flag_is_one_error_line(flags: list[str], message: str) -> None:
    proc = subprocess.run([*GPU_CHECK, *flags], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: {message} (see --help)\n"
