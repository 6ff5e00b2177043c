"""What the command-line tools (prepare, fineweb, compare) share."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `error:` line, like every other failure."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


# Value types for add_argument(type=...): argparse turns their ArgumentTypeError into a usage error.
def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (exclusive), e.g. 0.01")
    return value
