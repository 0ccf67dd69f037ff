"""What hf_clip's console scripts share: a user error is one line on stderr and exit status 2 (argparse's
convention for bad usage), with no traceback; any other exception is a bug and keeps its traceback.

A script raises `UsageError` (or an exception type it passes as `user_errors`) for input it refuses, and its
console-script entry point runs its `main` through `run_cli`:

    def main(argv: list[str] | None = None) -> None:
        run_cli(_main, argv, prog="hf-clip-export")
"""

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

USAGE_ERROR_STATUS = 2

T = TypeVar("T")


class UsageError(Exception):
    """Input a command refuses (a missing folder, a flag that cannot apply, an output it would overwrite). Its
    message names the input and what to do; `run_cli` prints it as one line."""


def one_line(message: str) -> str:
    """`message` with every run of whitespace, newlines included, as one space."""
    return " ".join(message.split())


def run_cli(main: Callable[[Sequence[str] | None], T], argv: Sequence[str] | None = None, *, prog: str,
            user_errors: tuple[type[BaseException], ...] = ()) -> T:
    """`main(argv)`; a `UsageError`, or an instance of one of `user_errors`, exits with status 2 after printing
    "{prog}: error: {message}" as one line on stderr, as argparse reports bad arguments. Other exceptions propagate
    with their traceback. Returns what `main` returns."""
    try:
        return main(argv)
    except (UsageError, *user_errors) as error:
        print(f"{prog}: error: {one_line(str(error)) or type(error).__name__}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR_STATUS) from None


__all__ = ["USAGE_ERROR_STATUS", "UsageError", "one_line", "run_cli"]
