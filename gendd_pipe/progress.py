"""A rich progress bar for extraction: shards done, images done and images/s."""

from __future__ import annotations

import threading
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ExtractProgress:
    """Counts shards (the bar) and images (the rate), fed from worker events or in-process calls."""

    def __init__(self, shards: int, done: int, enabled: bool = True):
        self.enabled, self.images, self.start = enabled, 0, time.perf_counter()
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
            TextColumn("{task.fields[images]} images"), TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(), disable=not enabled,
        )
        self._task = self._progress.add_task("extract", total=shards, completed=done, images=0, rate="-")

    def __enter__(self) -> "ExtractProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def add_images(self, n: int) -> None:
        with self._lock:
            self.images += n
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
            self._progress.update(self._task, images=self.images, rate=f"{rate:,.1f}")

    def shard_done(self) -> None:
        self._progress.advance(self._task)
