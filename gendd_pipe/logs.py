"""Logging: rich on a terminal, plain timestamped lines otherwise (``dvc repro``, batch jobs, CI).

`setup_logging` configures the ``gendd_pipe`` logger once per process; the CLI's
``--quiet`` / ``--verbose`` lower or raise its level. Progress follows the same
rule (`gendd_pipe.progress`): live bars on a terminal, a log line every
``GENDD_PIPE_PROGRESS_INTERVAL`` seconds (30 by default) otherwise.
"""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler

LOGGER = "gendd_pipe"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_terminal() -> bool:
    return sys.stderr.isatty()


def progress_interval() -> float:
    """Seconds between progress lines when output is not a terminal."""
    return float(os.environ.get("GENDD_PIPE_PROGRESS_INTERVAL", "30"))


def setup_logging(verbosity: int = 0) -> None:
    """-1: warnings and errors only (``--quiet``); 0: progress and results; 1: debug (``--verbose``)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if is_terminal():
        handler = RichHandler(console=Console(stderr=True), show_path=False, log_time_format="[%X]")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
