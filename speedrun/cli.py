"""What the command-line tools (prepare, fineweb, compare) share."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `error:` line, like every other failure."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")
