"""What every command-line entry point shares: clear errors on the terminal, exceptions in-process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .checkpoint import CheckpointError
from .sampling import SolveFailed

Args = TypeVar("Args")
# OSError: a full disk, a file where a folder should be, a folder without permission; its message names the file.
# SolveFailed: a sampling solve that did not reach its end time; its message names the settings.
USER_ERRORS = (ValueError, OSError, CheckpointError, SolveFailed)


class RunStopped(Exception):
    """A run stopped by SIGINT or SIGTERM before its end (it saved a checkpoint first). From a terminal the
    command exits with 128 + the signal's number (130, 143), as a shell expects of an interrupted program."""

    def __init__(self, signum: int, step: int, run_dir: str):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(f"stopped by signal {signum} at step {step}; continue with --load_dir {run_dir}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_cli(parse: Callable[[list[str]], Args], run: Callable[[Args], Any], argv: list[str] | None) -> Any:
    """Parse and run. From a terminal (`argv` None) a user error prints one line and exits 2, and a run stopped
    by a signal exits 130 or 143; called in-process (tests, notebooks), the exception propagates."""
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except RunStopped as stopped:
        if argv is not None:
            raise
        print(f"error: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except USER_ERRORS as error:
        if argv is not None:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
