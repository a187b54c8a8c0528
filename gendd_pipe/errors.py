"""Errors a user can cause: bad input, mismatched stores, unknown names.

The CLI prints these, and filesystems refusing a write (`OSError`: disk full,
read-only, not a directory), as one line and exits non-zero; anything else is
a bug and keeps its traceback.
"""


class GenddError(Exception):
    """A user-facing error whose message names the file, shard or key at fault."""


def user_message(exc: Exception) -> str:
    """The one line a user sees for a `GenddError` or an `OSError` (the path, then what the system said)."""
    if isinstance(exc, OSError) and exc.strerror:
        path = exc.filename2 or exc.filename
        return f"{path}: {exc.strerror}" if path else exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
