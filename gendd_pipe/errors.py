"""Errors a user can cause: bad input, mismatched stores, unknown names.

The CLI prints these, and filesystems refusing a write (`OSError`: disk full,
read-only, not a directory), as one line and exits non-zero; anything else is
a bug and keeps its traceback.
"""

import re

# torch re-raises an error of a DataLoader worker as the same type, its message the worker's traceback
_FROM_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class GenddError(Exception):
    """A user-facing error whose message names the file, shard or key at fault."""


def user_message(exc: Exception) -> str:
    """The one line a user sees for a `GenddError` or an `OSError` (the path, then what the system said)."""
    if isinstance(exc, OSError) and exc.strerror:
        path = exc.filename2 or exc.filename
        return f"{path}: {exc.strerror}" if path else exc.strerror
    text = str(exc)
    if _FROM_WORKER.match(text):  # the worker's own message: the traceback's last line, after "Type: "
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(exc).__name__
