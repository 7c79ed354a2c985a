"""What every command-line entry point shares: clear errors on the terminal, exceptions in-process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .checkpoint import CheckpointError
from .sampling import SolveFailed

Args = TypeVar("Args")
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, SolveFailed)


def run_cli(parse: Callable[[list[str]], Args], run: Callable[[Args], Any], argv: list[str] | None) -> Any:
    """Parse and run. From a terminal (`argv` None) a user error prints one line and exits 2;
    called in-process (tests, notebooks), the exception propagates."""
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        if argv is not None:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
