"""One error type for bad input, printed as one line with a non-zero exit by every command."""
from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


def run_cli(fn) -> None:
    """Run a command's main; a UserError becomes one line on stderr and exit status 2."""
    try:
        code = fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
