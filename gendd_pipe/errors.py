"""Errors a user can cause: bad input, mismatched stores, unknown names.

The CLI prints these as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class GenddError(Exception):
    """A user-facing error whose message names the file, shard or key at fault."""
