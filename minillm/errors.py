"""The one exception type for a user's mistake, and how scripts report it.

Library code raises `UserError` (a `ValueError`) when the input is wrong in a way the user can fix:
a missing data folder, a file that is not a checkpoint, a flag out of range. The message names the
file, the field and the expected form. Scripts wrap their `main` in `run_main`, which prints such an
error as one line on stderr and exits with status 2; every other exception is a bug in minillm and
keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(ValueError):
    """Bad input or flags: printed by scripts as one line, never as a traceback."""


def run_main(main, *args, **kwargs):
    """Call `main(*args, **kwargs)`; a `UserError` becomes `error: <message>` and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


__all__ = ["UserError", "run_main"]
