"""What the benchmark scripts share: a parser whose --help shows the script's whole docstring, option types,
and bad input as one line with exit code 2, as the cleantune command line does."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cleantune.cli import _Parser  # its errors are one-line UserErrors, as the command line's
from cleantune.errors import UserError


def parser(doc: str) -> argparse.ArgumentParser:
    return _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got '{text}'")
    return value


def floats(text: str) -> list[float]:
    """A comma list of positive numbers (`--lrs 1e-4,3e-4`)."""
    return [positive_float(x) for x in text.split(",") if x.strip()]


def names(option: str, text: str, known) -> list[str]:
    """A comma list of names, each one of `known`."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = next((x for x in out if x not in known), None)
    if bad is not None or not out:
        raise UserError(f"{option}: unknown name '{bad}' (known: {', '.join(known)})" if bad is not None
                        else f"{option}: no name given")
    return out


def run_script(main: Callable[[], int | None]) -> None:
    """Exit with main()'s code; a UserError (bad input, a setting the run refuses) is one line and exit code 2."""
    try:
        code = main()
    except UserError as e:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {e}\n")
        code = 2
    sys.exit(code or 0)
