"""Streaming image shards to a network: the DataLoader every stream runs in, epochs split among ranks and
workers, and the streams that need no store.

One DataLoader serves every epoch of a run (`EpochStream`: its workers start once and persist, and
``loader.dataset.set_epoch(e)`` selects the epoch). An epoch reads the shards in an order shuffled from
(seed, epoch) and is split by rows, not by whole shards (`epoch_part`): every torchrun rank runs the same
number of steps and every row of the epoch's first ``steps x batch`` is read by exactly one rank and worker.
Images leave as uint8 pixels (pinned for a GPU); `gendd_pipe.runtime.network_input` normalizes them on the
device.

`eval_pipeline` streams images alone (the eval view), for validation and for fitting a linear probe;
`augmented_pipeline` streams images with a fresh random view per (seed, epoch, key), for fine-tuning a teacher
before extraction. The student's stream joined with a feature store is `gendd_pipe.data.loader`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import partial

import webdataset as wds
from numcodecs import blosc
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms.functional import pil_to_tensor

from gendd_pipe import seeds
from gendd_pipe.data.render import render_pixels, render_view
from gendd_pipe.data.shards import Sample, ShardReader
from gendd_pipe.data.views import ViewConfig, eval_view, random_view
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url


def workers(requested: int | None) -> int:
    """DataLoader workers: ``requested``, or for None one per core this process may use beside its training
    loop (the node's cores shared among its torchrun ranks), at least 1 and at most 8."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


class EpochStream(IterableDataset):
    """Every epoch of a run as one dataset: iterating it yields ``pipeline(epoch)`` for the epoch last given to
    `set_epoch`, kept in shared memory so that persistent DataLoader workers follow it."""

    def __init__(self, pipeline: Callable[[int], Iterable], epoch: int = 0):
        self.pipeline, self._epoch = pipeline, multiprocessing.Value("q", epoch, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self):
        return iter(self.pipeline(self._epoch.value))


WORKER_NICENESS = 10  # loader workers of a CPU loop yield the cores to it


def _worker_start(_worker_id: int, niceness: int) -> None:
    """A loader worker's start: every thread pool in it (numpy's BLAS and OpenMP, Blosc; torch's is one thread
    in workers already) at one thread, since the workers are the parallelism and a pool's threads would contend
    with the other workers and the loop; then, feeding a loop on the CPU, a lower priority. That loop's OpenMP
    team waits at every barrier for a thread that a worker has preempted; at niceness `WORKER_NICENESS` the
    workers take the cores the team leaves idle (on 2 cores a resnet10t step at 32 px from a worker at priority
    0 took 3.6x the bare step, at niceness 10 1.5x: `benchmarks/distill.py`, cache efficiency). A loop on a GPU
    spins on a core of its own: its workers keep their priority, or a spinning loop would starve them."""
    threadpool_limits(1)
    blosc.set_nthreads(1)
    blosc.use_threads = False
    if niceness:
        os.nice(niceness)


def data_loader(dataset, batch_size: int, num_workers: int | None, cuda: bool, **kwargs) -> DataLoader:
    """A DataLoader of ``dataset`` whose workers persist between the epochs of an `EpochStream`; ``cuda``: it feeds
    a CUDA device (batches pinned, workers at the loop's priority), else a loop on the CPU."""
    n = workers(num_workers)
    start = partial(_worker_start, niceness=0 if cuda else WORKER_NICENESS)
    return DataLoader(dataset, batch_size=batch_size, num_workers=n, pin_memory=cuda,
                      persistent_workers=n > 0 and isinstance(dataset, EpochStream), worker_init_fn=start, **kwargs)


def epoch_steps(samples: int, batch_size: int, world: int) -> tuple[int, int]:
    """(steps, per-rank batch) of an epoch of ``samples`` at the global ``batch_size`` over ``world`` ranks;
    the epoch's last ``samples % batch_size`` samples (fewer than one step) wait for a later epoch."""
    if batch_size % world:
        raise GenddError(f"batch_size {batch_size} is the global batch and must divide among the {world} ranks; "
                         f"use a multiple of {world}")
    if samples < batch_size:
        raise GenddError(f"{samples} training samples do not fill one global batch of {batch_size}; "
                         "use a smaller batch_size or more shards")
    return samples // batch_size, batch_size // world


def epoch_part(counts: list[int], steps: int, batch: int, world: int, rank: int, workers: int,
               worker: int) -> list[tuple[int, int, int]]:
    """The ``(shard, first row, end row)`` ranges that one rank's DataLoader worker reads of an epoch.

    The epoch is the shards' rows in (shuffled) order, cut into ``steps x world`` batches of ``batch`` rows;
    the rank x worker slots take contiguous runs of whole batches, so rank ``r`` gets exactly ``steps``
    batches (its workers between them) and every row before ``steps x world x batch`` goes to one slot."""
    slots, batches = world * workers, steps * world
    slot = rank * workers + worker
    start, end = slot * batches // slots * batch, (slot + 1) * batches // slots * batch
    part, offset = [], 0
    for shard, count in enumerate(counts):
        first, last = max(start, offset), min(end, offset + count)
        if first < last:
            part.append((shard, first - offset, last - offset))
        offset += count
    return part


def epoch_shards(urls, counts: list[int], steps: int, batch: int, world: int):
    """Pipeline stage: the shard URLs in epoch order -> ``{"url", "rows"}`` of this rank and worker's part."""
    urls = [item["url"] for item in urls]
    rank, _, worker, workers = wds.utils.pytorch_worker_info()
    for shard, first, end in epoch_part(counts, steps, batch, world, rank, workers, worker):
        yield {"url": urls[shard], "rows": (first, end)}


def each(src, fn):
    """Pipeline stage: ``fn`` applied to every item (plain, so no bookkeeping keys are added)."""
    for item in src:
        yield fn(item)


@contextmanager
def naming_the_sample(url: str, sample: Sample):
    """An image that fails to decode or render as one line naming its shard and key."""
    try:
        yield
    except ValueError as exc:
        raise GenddError(f"{public_url(url)}: sample {sample.key}: {exc}") from exc


def epoch_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shards in the order an epoch reads them, shuffled from (seed, epoch)."""
    order = list(urls)
    seeds.shuffler(seed, epoch, "shards").shuffle(order)
    return order


def epoch_pipeline(urls: list[str], split, source, render, seed: int, epoch: int, shuffle_buffer: int):
    """One epoch's samples: shards in epoch order (``urls``), ``split`` among ranks and workers, ``source``
    turning shard URLs into samples, buffer-shuffled from (seed, epoch), ``render`` making each one's tensors."""
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        *split,
        source,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=seeds.shuffler(seed, epoch, "samples")),
        partial(each, fn=render),
    )


def images(urls, by_rank: bool = False):
    """Pipeline stage: ``{"url"[, "rows"]}`` dicts -> ``{"url", "sample"}`` of their samples (rows ``[first,
    end)`` where given), opened but not yet decoded; ``by_rank``: only every world-th sample of each shard, from
    this rank's offset, so that the ranks between them take each sample once."""
    rank, world = wds.utils.pytorch_worker_info()[:2] if by_rank else (0, 1)
    for item in urls:
        first, end = item.get("rows", (0, None))
        for i, sample in enumerate(ShardReader(item["url"], on_error="fail", decode=False)):
            if end is not None and i >= end:
                break
            if i >= first and i % world == rank:
                yield {"url": item["url"], "sample": sample}


def _render_eval(item: dict, data_config: dict) -> dict:
    sample: Sample = item["sample"]
    size = data_config["input_size"][1:]
    view = eval_view(*sample.image.size, size, data_config["crop_pct"], data_config.get("crop_mode", "center"))
    with naming_the_sample(item["url"], sample):
        image = pil_to_tensor(render_view(sample.rgb(), view, size, data_config["interpolation"]))
    return {"image": image, "label": sample.label}


def eval_pipeline(urls: list[str], data_config: dict, batch_size: int, num_workers: int | None = None,
                  cuda: bool = False) -> DataLoader:
    """Batches of ``image`` (uint8, the eval view: resize + center crop) and ``label``, in shard order; under
    torchrun, this rank's share (each sample on exactly one rank): whole shards where there are at least as many
    as ranks (each shard read by one rank only), else every world-th sample of every shard."""
    rank, world = wds.utils.pytorch_worker_info()[:2]
    whole = len(urls) >= world
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)[rank::world] if whole else list(urls)),
        wds.split_by_worker,
        partial(images, by_rank=not whole),
        partial(each, fn=partial(_render_eval, data_config=data_config)),
    )
    return data_loader(pipeline, batch_size, num_workers, cuda)


def _render_augmented(item: dict, data_config: dict, views: ViewConfig, epoch: int) -> dict:
    sample: Sample = item["sample"]  # decoded by the renderer
    view = random_view(*sample.image.size, views, seeds.rng(views.seed, f"{epoch}:{sample.key}", 0))
    with naming_the_sample(item["url"], sample):
        image = render_pixels(views.renderer, sample, view[None], data_config)[0]
    return {"image": image, "label": sample.label}


def _augmented_epoch(epoch: int, urls: list[str], counts: dict[str, int], batch_size: int, data_config: dict,
                     views: ViewConfig, shuffle_buffer: int):
    order = epoch_order(urls, views.seed, epoch)
    sizes = [counts[u] for u in order]
    steps, _ = epoch_steps(sum(sizes), batch_size, 1)
    return epoch_pipeline(order, [partial(epoch_shards, counts=sizes, steps=steps, batch=batch_size, world=1)], images,
                  partial(_render_augmented, data_config=data_config, views=views, epoch=epoch), views.seed, epoch,
                  shuffle_buffer)


def augmented_pipeline(urls: list[str], counts: dict[str, int], data_config: dict, views: ViewConfig,
                       batch_size: int, epoch: int = 0, shuffle_buffer: int = 1000, num_workers: int | None = None,
                       cuda: bool = False) -> DataLoader:
    """Batches of ``image`` (uint8, a random-resized crop drawn from (views.seed, epoch, key)) and ``label``,
    shards and samples shuffled from (views.seed, epoch), each epoch's first ``steps x batch_size`` samples once
    (``counts``: samples per shard URL). It serves ``epoch`` until ``loader.dataset.set_epoch`` selects another."""
    stream = EpochStream(partial(_augmented_epoch, urls=list(urls), counts=counts, batch_size=batch_size,
                                 data_config=data_config, views=views, shuffle_buffer=shuffle_buffer), epoch)
    return data_loader(stream, batch_size, num_workers, cuda, drop_last=True)
