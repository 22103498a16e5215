"""The two kinds of failure a user sees, each one line on stderr:

- UserError: bad input (flags, files, directories), found before anything is written; exit 2.
- RunFailure: the run itself failed (non-finite loss, disk full, unwritable directory); what was
  written before (the last good checkpoint, an earlier export) is intact; exit 1.
"""
from __future__ import annotations

import sys
import traceback

USAGE_EXIT = 2
FAILURE_EXIT = 1


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class RunFailure(Exception):
    """A failure during a run: the message says what failed, at which step, and what is kept."""


def first_line(err: Exception, limit: int = 200) -> str:
    """An exception's first line (its type's name when it has no message), cut to `limit` characters."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


# Called with (exit code, reason) before a failing command exits: hosts.start registers the one that tells
# the job's other processes (a multi-process run), so they stop at once instead of waiting in a collective.
ON_FAILURE: list = []
# Called with a RunFailure's text before it is printed: in a multi-process run hosts' watchdog waits there when
# a collective failed because another process vanished, and names that process instead (its line, its exit).
BEFORE_FAILURE: list = []


def _failed(code: int, reason: str) -> None:
    for hook in ON_FAILURE:
        hook(code, reason)
    sys.exit(code)


def run_cli(fn) -> None:
    """Run a command's main and exit: 0, or one `error: ...` line with exit 2 (UserError) or 1 (RunFailure)."""
    try:
        code = fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        _failed(USAGE_EXIT, first_line(err))
    except RunFailure as err:
        for hook in BEFORE_FAILURE:
            hook(str(err))
        print(f"error: {err}", file=sys.stderr)
        _failed(FAILURE_EXIT, first_line(err))
    except Exception as err:
        if ON_FAILURE:  # another process must not wait for this one: tell it, then show the traceback
            traceback.print_exc()
            _failed(FAILURE_EXIT, f"{type(err).__name__}: {first_line(err)}")
        raise
    sys.exit(code or 0)
