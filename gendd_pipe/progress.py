"""Rich progress bars: extraction (shards, images, images/s) and training steps (with the running loss)."""

from __future__ import annotations

import threading
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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


class StepBar:
    """A transient bar over the steps of one training epoch, showing the running mean loss.

    ``with StepBar(title, steps, enabled) as bar: bar.step(loss)``; disabled, it draws nothing.
    """

    def __init__(self, title: str, steps: int, enabled: bool = True):
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True,
                                  disable=not enabled)
        self._task = self._progress.add_task(title, total=steps, loss=float("nan"))
        self._sum, self._n = 0.0, 0

    def __enter__(self) -> "StepBar":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def step(self, loss: float) -> None:
        self._sum, self._n = self._sum + loss, self._n + 1
        self._progress.update(self._task, advance=1, loss=self._sum / self._n)
