"""Errors a user can cause: bad input, mismatched stores, unknown names.

Every entry point (the CLI's commands, the DVC stages) runs under `one_line_errors`,
which prints these, and filesystems refusing a write (`OSError`: disk full,
read-only, not a directory), as one line and exits 1; anything else is a bug and
keeps its traceback.
"""

import re
from contextlib import contextmanager

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


@contextmanager
def one_line_errors():
    """Run the body; an error a user can cause ends the process with ``error: <one line>`` on stderr and exit
    code 1, without a traceback."""
    try:
        yield
    except (GenddError, OSError) as exc:
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "red"), " ", user_message(exc)),
                                                   highlight=False)
        raise SystemExit(1) from None
