"""Progress of long work: live rich bars on a terminal, a log line at a steady interval otherwise.

`ExtractProgress` counts shards and images (fed from Dask worker events or
in-process calls); `StepBar` counts the steps of one training epoch with the
running mean loss. ``enabled=False`` shows nothing; so does a logger set to
warnings only (``--quiet``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gendd_pipe.logs import is_terminal, progress_interval

log = logging.getLogger("gendd_pipe.progress")


class _Ticker:
    """Says ``line()`` through the log every ``progress_interval()`` seconds, and once at the end."""

    def __init__(self, enabled: bool):
        self.live = enabled and log.isEnabledFor(logging.INFO) and is_terminal()
        self.lines = enabled and log.isEnabledFor(logging.INFO) and not is_terminal()
        self.start = self.last = time.perf_counter()
        self.interval = progress_interval()

    def tick(self, line) -> None:
        now = time.perf_counter()
        if self.lines and now - self.last >= self.interval:
            self.last = now
            log.info(line())

    def elapsed(self) -> str:
        return str(timedelta(seconds=int(time.perf_counter() - self.start)))


def _nvml_handle(pynvml, index: int):
    """The NVML handle of CUDA device ``index`` as this process numbers it (through ``CUDA_VISIBLE_DEVICES``,
    by index or UUID)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index < len(visible):
        entry = visible[index]
        if not entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        index = int(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_status(gpus: tuple[int, ...]) -> str:
    """``cuda:0 87% 10.2/139.8 GiB`` for each GPU index given: utilisation and memory device-wide (so the Dask
    workers' use is seen too), read through NVML, which opens no CUDA context in this process; empty without
    NVML (``nvidia-ml-py``) or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver: no GPU status
        return ""
    parts = []
    for index in gpus:
        try:
            handle = _nvml_handle(pynvml, index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            busy = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # noqa: BLE001 - a device NVML cannot read (a MIG slice, a lost GPU)
            continue
        parts.append(f"cuda:{index} {busy}% {memory.used / 2**30:.1f}/{memory.total / 2**30:.1f} GiB")
    return ", ".join(parts)


class ExtractProgress:
    """Counts shards (the bar) and images (the rate); on GPUs, shows their utilisation and memory."""

    def __init__(self, shards: int, done: int, enabled: bool = True, gpus: tuple[int, ...] = ()):
        self.images, self.shards, self.done, self.gpus = 0, shards, done, gpus
        self._gpu, self._gpu_at = "", 0.0
        self._ticker = _Ticker(enabled)
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
            TextColumn("{task.fields[images]} images"), TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(), TextColumn("{task.fields[gpu]}"), disable=not self._ticker.live,
        )
        self._task = self._progress.add_task("extract", total=shards, completed=done, images=0, rate="-", gpu="")

    def _gpus(self) -> str:
        """The GPU status, refreshed at most once a second."""
        if self.gpus and (self._ticker.live or self._ticker.lines) and time.perf_counter() - self._gpu_at >= 1.0:
            self._gpu, self._gpu_at = gpu_status(self.gpus), time.perf_counter()
        return self._gpu

    def __enter__(self) -> "ExtractProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
        if self._ticker.lines:
            log.info(self._line())

    def _rate(self) -> float:
        return self.images / max(time.perf_counter() - self._ticker.start, 1e-9)

    def _line(self) -> str:
        gpu = f", {self._gpu}" if self._gpu else ""
        return (f"extract: {self.done}/{self.shards} shards, {self.images:,} images, {self._rate():,.1f} img/s, "
                f"elapsed {self._ticker.elapsed()}{gpu}")

    def add_images(self, n: int) -> None:
        with self._lock:
            self.images += n
            self._progress.update(self._task, images=self.images, rate=f"{self._rate():,.1f}", gpu=self._gpus())
            self._ticker.tick(self._line)

    def shard_done(self) -> None:
        with self._lock:
            self.done += 1
            self._progress.advance(self._task)
            self._ticker.tick(self._line)


class StepBar:
    """The steps of one training epoch with the running mean loss: ``with StepBar(title, steps) as bar:
    bar.step(loss)``."""

    def __init__(self, title: str, steps: int, enabled: bool = True):
        self.title, self.steps = title, steps
        self._ticker = _Ticker(enabled)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True,
                                  disable=not self._ticker.live)
        self._task = self._progress.add_task(title, total=steps, loss=float("nan"))
        self._sum, self._n, self._mean, self._read = 0.0, 0, float("nan"), 0.0

    def __enter__(self) -> "StepBar":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def _line(self) -> str:
        return f"{self.title}: step {self._n}/{self.steps}, loss {self._mean:.4f}, elapsed {self._ticker.elapsed()}"

    def step(self, loss) -> None:
        """One step done; ``loss`` is a float or a 0-dim tensor, summed where it is and read back to the host
        at most once a second (a GPU step is not held up by the bar)."""
        self._sum, self._n = self._sum + loss, self._n + 1
        now = time.perf_counter()
        if now - self._read >= 1.0 or self._n == self.steps:
            self._mean, self._read = float(self._sum) / self._n, now
        self._progress.update(self._task, advance=1, loss=self._mean)
        self._ticker.tick(self._line)
