"""Dask for the stages that fan out over shards: a client on an existing scheduler or on a LocalCluster (CPU
workers, or one worker per GPU), the machine's cores split among local workers, and progress that tasks report
to the driver while they run."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from gendd_pipe.errors import GenddError
from gendd_pipe.runtime import RuntimeConfig, resolve_device

log = logging.getLogger(__name__)

PROGRESS_TOPIC = "gendd-pipe-progress"


def report_progress(images: int) -> None:
    """Tell the driver's progress bar about finished images (no-op outside a Dask worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        worker.log_event(PROGRESS_TOPIC, (worker.get_current_task(), worker.id, images))
    except ValueError:
        pass


def worker_devices(runtime: RuntimeConfig, visible: int) -> tuple[str, ...]:
    """The device of each local Dask worker: one worker per visible GPU for device ``auto`` or ``cuda``, one on
    the GPU that ``cuda:N`` names; none (CPU workers, ``dask_workers`` of them) without a GPU or on ``cpu``."""
    if runtime.device == "cpu" or visible == 0:
        return ()
    if runtime.device in ("auto", "cuda"):
        return tuple(f"cuda:{i}" for i in range(visible))
    return (runtime.device,)


def local_devices(runtime: RuntimeConfig, workers: int, scheduler: str | None) -> tuple[str, ...]:
    """`worker_devices` for the GPUs of this machine, when this machine starts the workers."""
    if scheduler or workers == 0:
        return ()
    return worker_devices(runtime, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def this_worker_device(devices: tuple[str, ...]) -> str:
    """The device of the local worker running this task (workers are named 0, 1, ... by the LocalCluster)."""
    from distributed import get_worker

    return devices[int(get_worker().name)]


def task_runtime(runtime: RuntimeConfig, devices: tuple[str, ...]) -> RuntimeConfig:
    """The runtime a task runs its network on, that device made the process's current one (``set_device``) before
    any CUDA work, so that nothing opens a context on another GPU: a local cluster's GPU worker takes its own
    device (``devices``, by worker name); elsewhere ``runtime``'s. A process that sees several GPUs and is told
    ``auto`` or ``cuda`` uses the first, and says so once (give each worker of an external cluster one GPU through
    ``CUDA_VISIBLE_DEVICES``)."""
    if devices:
        runtime = replace(runtime, device=this_worker_device(devices))
    device = resolve_device(runtime)
    if device.type == "cuda":
        if not devices and runtime.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
            _say_once(f"this process sees {torch.cuda.device_count()} GPUs and runs on {device}; start one worker per "
                      "GPU, each with CUDA_VISIBLE_DEVICES set to its GPU, to use them all")
        torch.cuda.set_device(device)
    return runtime


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def split_threads(threads: int | None, workers: int, scheduler: str | None) -> int | None:
    """Torch threads per worker: as given, else the machine's cores split among the local workers (an existing
    cluster's workers keep their own)."""
    if threads or scheduler:
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@contextmanager
def dask_client(scheduler: str | None, workers: int, threads: int | None, devices: tuple[str, ...] = ()):
    """A client on ``scheduler``, or on a fresh LocalCluster: one worker per device in ``devices`` (each with
    the resource ``GPU=1``), else ``workers`` CPU workers of ``threads`` torch threads."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    gpus = {"resources": {"GPU": 1}} if devices else {}
    # Dask's default worker environment sets MALLOC_TRIM_THRESHOLD_=65536, which makes torch's large
    # allocations 2-3x slower; workers get only their thread counts.
    n = str(threads or 1)
    environ = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
            LocalCluster(n_workers=len(devices) or workers, threads_per_worker=1, processes=True,
                         dashboard_address=None, silence_logs=logging.ERROR, **gpus) as cluster, \
            Client(cluster) as client:
        yield client


@dataclass(frozen=True)
class TaskFailure:
    """A task that stopped on an error the user can act on: its one line, returned as the task's result so that
    no worker logs it with a traceback; the driver raises it."""

    message: str


def as_result(task: Callable, *args, **kwargs):
    """``task(*args, **kwargs)``, a `GenddError` it raises returned as a `TaskFailure`."""
    try:
        return task(*args, **kwargs)
    except GenddError as exc:
        return TaskFailure(str(exc))


def run_in_process(task: Callable, shards: Iterable[tuple[str, str]], args: tuple,
                   extra: dict[str, dict] | None = None) -> Iterator[tuple[str, object]]:
    """(name, ``task(url, *args, **extra[name])``) for each (name, url) of ``shards``, one after another here."""
    for name, url in shards:
        yield name, as_result(task, url, *args, **(extra or {}).get(name, {}))


def run_per_shard(task: Callable, shards: Iterable[tuple[str, str]], args: tuple, client, bar,
                  devices: tuple[str, ...] = (), extra: dict[str, dict] | None = None) -> Iterator[tuple[str, object]]:
    """(name, result) of ``task(url, *args, devices=devices, **extra[name])`` for each (name, url) of ``shards``,
    as one Dask task each (on a GPU worker where ``devices`` are given), in the order they finish; a
    `GenddError` is a `TaskFailure` result. Shards are drawn from ``shards`` as workers free up (two tasks
    queued per worker), so that a writer beside this one takes its share. ``bar`` counts images as tasks report
    them (a task retried on another worker counts from zero again, the lost attempt's images taken back); the
    scheduler retries a task whose worker was lost on another worker."""
    from distributed import as_completed

    attempts: dict[str, list] = {}  # task key -> [the worker running it, the images it reported]

    def on_progress(event) -> None:
        key, worker, images = event[1]
        attempt = attempts.setdefault(key, [worker, 0])
        if attempt[0] != worker:  # retried after its worker was lost: what that worker did is done again
            bar.add_images(-attempt[1])
            attempt[:] = [worker, 0]
        attempt[1] += images
        bar.add_images(images)

    client.subscribe_topic(PROGRESS_TOPIC, on_progress)
    gpu = {"resources": {"GPU": 1}} if devices else {}
    queue, names, running = iter(shards), {}, as_completed()

    def submit_next() -> None:
        for name, url in queue:
            future = client.submit(as_result, task, url, *args, devices=devices, **(extra or {}).get(name, {}),
                                   key=f"{task.__name__}-{name}", pure=False, **gpu)
            names[future.key] = name
            running.add(future)
            return

    for _ in range(2 * max(1, len(client.nthreads()))):
        submit_next()
    for future in running:
        result = future.result()
        future.release()  # its worker may go now without the scheduler running it again for its result
        yield names.pop(future.key), result
        submit_next()
