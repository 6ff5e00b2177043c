"""Shared data fixtures (conftest.py loads this module through `pytest_plugins`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speedrun.data.stdlib_corpus import build_stdlib_corpus


@pytest.fixture(scope="session")
def stdlib_corpus_dir() -> Path:
    """The real stdlib corpus in the default cache: built once, then shared by the suite and `make train`."""
    return build_stdlib_corpus()
