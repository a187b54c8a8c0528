"""Streaming images beside their cached teacher outputs: the student's WebDataset loaders.

`train_pipeline` is a webdataset pipeline over the image shards. For each shard a
worker opens, it reads the matching feature shard from the store as one block
(`FeatureStore.read_shard`, checked against its checksums) and joins sample by sample on the key, so there are
no per-sample random reads of Zarr chunks. Each sample then picks one of its
cached training views (view 0, the eval view, only with ``eval_view``) and
replays it (`Replay`: the view's crop and flip, with the renderer and
interpolation the store was extracted with, then any stored RandAugment draw and
mix) at the student's input size: the student sees the pixels the teacher saw.
With ``fresh_scale`` it draws a new random crop per epoch instead and reads no
teacher output (GenDD's stage 1).

Shards are shuffled per epoch and the epoch is split by samples, not by whole
shards (`epoch_part`): every torchrun rank runs the same number of steps and
every sample of the epoch's first ``steps x batch`` is read by exactly one rank
and DataLoader worker, whatever the shard sizes. Samples then pass a shuffle
buffer. Every random choice derives from (seed, epoch), so an epoch replays
identically after a resume, and alike with any number of workers.

A training loader serves every epoch of a run (`EpochStream`): its workers start
once and persist, and ``loader.dataset.set_epoch(e)`` before iterating selects
the epoch. Images leave every loader as uint8 pixels (pinned for a GPU);
`gendd_pipe.runtime.network_input` normalizes them on the device, so a quarter
of the bytes cross to it.

`eval_pipeline` streams images alone (the eval view), for validation and for
fitting a linear probe; `augmented_pipeline` streams images with a fresh random
view per (seed, epoch, key), for fine-tuning a teacher before extraction.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import fsspec
import numpy as np
import torch
import webdataset as wds
from numcodecs import blosc
from pydantic import Field
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms.functional import pil_to_tensor

from gendd_pipe import seeds
from gendd_pipe.config import NonNegativeInt, PositiveInt, configclass
from gendd_pipe.data.augment import NO_MIX, is_mixed, mixed_target
from gendd_pipe.data.render import create_renderer, render_pixels, render_view
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample, ShardReader, Skipped, shard_name
from gendd_pipe.data.views import ViewConfig, eval_view, random_view
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.store.format import VIEW_ARRAYS, is_int8, is_mixed_store, renderer_of
from gendd_pipe.store.reader import FeatureStore

log = logging.getLogger(__name__)


@configclass
class LoaderConfig:
    """How samples are streamed to the student."""

    batch_size: PositiveInt = 128  # samples per step over all torchrun ranks (each takes batch_size / world)
    shuffle_buffer: PositiveInt = 1000  # samples held in the shuffle buffer
    num_workers: NonNegativeInt | None = None  # DataLoader worker processes; None: sized to the cores (`workers`)
    verify: bool = True  # check feature shards against their checksums, image shards against their sha256
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0  # soft labels: (1 - s) one-hot + s / C, then mixed
    views: Annotated[int, Field(ge=2)] | None = None  # train on the first N cached views, as from a store of N views
    # (every view is drawn from (seed, key, view) alone, so those are that store's); None: all of them
    eval_view: bool = False  # also train on view 0, the eval view (a center crop); off: the random views alone, as
    # the official student never trains on the center crop


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


def _loader(dataset, batch_size: int, num_workers: int | None, cuda: bool, **kwargs) -> DataLoader:
    """A DataLoader of ``dataset`` whose workers persist between the epochs of an `EpochStream`; ``cuda``: it feeds
    a CUDA device (batches pinned, workers at the loop's priority), else a loop on the CPU."""
    n = workers(num_workers)
    start = partial(_worker_start, niceness=0 if cuda else WORKER_NICENESS)
    return DataLoader(dataset, batch_size=batch_size, num_workers=n, pin_memory=cuda,
                      persistent_workers=n > 0 and isinstance(dataset, EpochStream), worker_init_fn=start, **kwargs)


def check_shards(store: FeatureStore, urls: list[str]) -> dict[str, int]:
    """Every image shard must have a complete feature shard; returns name -> sample count."""
    have = set(store.shard_names)
    counts = {}
    for url in urls:
        name = shard_name(url)
        if name not in have:
            raise GenddError(f"{url}: store {store.url} has no complete feature shard {name!r} (run extract on it)")
        counts[name] = int(store.shard(name).attrs["count"])
    return counts


def _skipped_keys(store: FeatureStore) -> dict[str, set[str]]:
    skipped: dict[str, set[str]] = {}
    for entry in store.manifest.get("skipped", []):
        if entry.get("key") is not None:
            skipped.setdefault(entry["shard"], set()).add(entry["key"])
    return skipped


def join_shard(url: str, features: dict[str, np.ndarray], skipped: set[str], source_sha256: str | None = None):
    """Yield ``(sample, row)`` pairs of an image shard and its feature shard, checking keys in order.

    Samples the extract skipped (recorded in the manifest) are passed over; any
    other disagreement is a `GenddError` naming the shard and the key. With
    ``source_sha256``, the image shard read to its end must have the bytes the
    store was extracted from (the hash is taken on the way, at no extra read).
    """
    keys, row = features["keys"], 0
    reader = ShardReader(url, on_error="skip", decode=False)  # decoded by the renderer, for the samples it renders
    for item in reader:
        if isinstance(item, Skipped):
            continue
        if row < len(keys) and item.key == keys[row]:
            yield item, row
            row += 1
        elif item.key not in skipped:
            expected = repr(str(keys[row])) if row < len(keys) else "the end of the feature shard"
            raise GenddError(f"{url}: sample {item.key!r} does not match the store (expected {expected}); "
                             "the store was built from other shards")
    if row != len(keys):
        raise GenddError(f"{url}: shard ended after {row} samples but the store has {len(keys)} "
                         f"(first missing key {str(keys[row])!r})")
    if source_sha256 and reader.sha256 != source_sha256:
        raise GenddError(f"{url}: not the bytes the store was extracted from (sha256 {reader.sha256[:12]}, the "
                         f"store's {source_sha256[:12]}): its images may differ from what the teacher saw; "
                         "re-extract it or pass the original")


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


def _epoch_shards(urls, counts: list[int], steps: int, batch: int, world: int):
    """Pipeline stage: the shard URLs in epoch order -> ``{"url", "rows"}`` of this rank and worker's part."""
    urls = [item["url"] for item in urls]
    rank, _, worker, workers = wds.utils.pytorch_worker_info()
    for shard, first, end in epoch_part(counts, steps, batch, world, rank, workers, worker):
        yield {"url": urls[shard], "rows": (first, end)}


@dataclass
class JoinedRow:
    """A sample of an image shard beside its row of the feature shard.

    Attributes:
        url: The image shard.
        sample: The sample, opened (decoded by the renderer when it renders).
        row: Its row in the feature shard.
        block: The feature shard's arrays (`FeatureStore.read_shard`).
        store: The store, which says what a view's teacher outputs are.
        partners: A mixed store's samples of the whole shard, by row (a view's partner may be any of them).
    """

    url: str
    sample: Sample
    row: int
    block: dict[str, np.ndarray]
    store: FeatureStore
    partners: list[Sample] | None = None

    @property
    def views(self) -> dict[str, np.ndarray]:
        """The arrays that make the pixels of this row's views (`VIEW_ARRAYS`: views, and jitter, augment, mix)."""
        return {k: self.block[k][self.row] for k in VIEW_ARRAYS if k in self.block}

    def teacher(self, view: int) -> dict[str, torch.Tensor]:
        """The teacher's outputs of one of the views, float32 tensors (`FeatureStore.teacher_outputs`)."""
        return {k: torch.from_numpy(v) for k, v in self.store.teacher_outputs(self.block, self.row, view).items()}


def _joined(urls, store_url: str, skipped: dict[str, set[str]], verify: bool = True):
    """Pipeline stage: ``{"url": ..., "rows": (first, end)}`` dicts -> a `JoinedRow` for each of those rows. A
    store with mixed views keeps each shard's samples (encoded) in memory, as ``partners``, since a row's partner
    may be any row of its shard."""
    store = FeatureStore.open(store_url)
    for item in urls:
        url = item["url"]
        name = shard_name(url)
        block = store.read_shard(name, verify)
        first, end = item["rows"]
        mixed = "mix" in block
        whole = mixed or end == len(block["keys"])  # read to its end: the shard's bytes are checked too
        source = store.shard(name).attrs.get("source_sha256") if verify and whole else None
        joined = join_shard(url, block, skipped.get(name, set()), source)
        partners = [sample for sample, _ in joined] if mixed else None
        if mixed:
            joined = ((partners[row], row) for row in range(first, end))
        for sample, row in joined:
            if row >= end:
                break
            if row >= first:
                yield JoinedRow(url, sample, row, block, store, partners)


def _each(src, fn):
    """Pipeline stage: ``fn`` applied to every item (plain, so no bookkeeping keys are added)."""
    for item in src:
        yield fn(item)


@contextmanager
def _naming_the_sample(url: str, sample: Sample):
    """An image that fails to decode or render as one line naming its shard and key."""
    try:
        yield
    except ValueError as exc:
        raise GenddError(f"{public_url(url)}: sample {sample.key}: {exc}") from exc


def _render_train(item: JoinedRow, replay: Replay, seed: int, epoch: int, targets: dict | None = None,
                  views: int | None = None, with_eval_view: bool = False) -> dict:
    """A joined row's sample at one of its cached views, picked from (seed, epoch, key), with the teacher's
    outputs of that view (and its soft ``target`` where ``targets`` asks for one)."""
    sample, row = item.sample, item.views
    count = views or len(row["views"])  # (train_pipeline refuses more views than the store has)
    augmented = any(k in row for k in ("jitter", "augment", "mix"))  # views 1..V-1 are augmented; 0 is the eval view
    first = 0 if with_eval_view and not augmented else 1
    v = first + seeds.index(count - first, seed, epoch, sample.key)  # uniform, from (seed, epoch, key)
    with _naming_the_sample(item.url, sample):  # the image decoded at extraction, so these are other bytes
        image = replay.views(sample, row, item.partners, item.block, [v])[0]
    out = {"key": sample.key, "image": image, "label": sample.label, "view": v, **item.teacher(v)}
    if targets is not None:  # the soft label: mixed with the partner's, smoothed, as timm's Mixup makes it
        mix = row["mix"][v] if "mix" in row else NO_MIX
        partner = item.partners[int(mix[0])].label if is_mixed(mix) else sample.label
        out["target"] = mixed_target(sample.label, partner, float(mix[2]), targets["num_classes"],
                                     targets["smoothing"])
    return out


def _render_fresh(item: JoinedRow, replay: Replay, views: ViewConfig, epoch: int, targets: dict | None = None) -> dict:
    """A joined sample rendered from a random-resized crop drawn afresh from (views.seed, epoch, key), by the store's
    renderer and interpolation; its cached views and features are not used."""
    sample = item.sample
    view = random_view(*sample.image.size, views, seeds.rng(views.seed, f"{epoch}:{sample.key}", 0))
    with _naming_the_sample(item.url, sample):
        image = replay.base(sample, view[None])[0]
    out = {"key": sample.key, "image": image, "label": sample.label}
    if targets is not None:  # label smoothing, as the cached path's soft labels (no partner: nothing is mixed)
        out["target"] = mixed_target(sample.label, sample.label, 1.0, targets["num_classes"], targets["smoothing"])
    return out


def epoch_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shards in the order an epoch reads them, shuffled from (seed, epoch)."""
    order = list(urls)
    seeds.shuffler(seed, epoch, "shards").shuffle(order)
    return order


def _epoch(urls: list[str], split, source, render, seed: int, epoch: int, shuffle_buffer: int):
    """One epoch's samples: shards in epoch order (``urls``), ``split`` among ranks and workers, ``source``
    turning shard URLs into samples, buffer-shuffled from (seed, epoch), ``render`` making each one's tensors."""
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        *split,
        source,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=seeds.shuffler(seed, epoch, "samples")),
        partial(_each, fn=render),
    )


@dataclass(frozen=True)
class TrainEpochs:
    """The training samples of any epoch of a run (what `EpochStream` serves): the shards in the epoch's order,
    this rank and worker's part of them (`epoch_part`), joined with the store (``source``), buffer-shuffled and
    rendered (``render``, given the epoch), every choice from (seed, epoch)."""

    urls: list[str]
    counts: dict[str, int]  # samples per shard name
    batch_size: int  # the global batch
    world: int
    seed: int
    shuffle_buffer: int
    source: Callable  # pipeline stage: this part's ``{"url", "rows"}`` -> `JoinedRow`
    render: Callable  # a `JoinedRow` and the epoch -> the sample's tensors

    def __call__(self, epoch: int):
        order = epoch_order(self.urls, self.seed, epoch)
        sizes = [self.counts[shard_name(u)] for u in order]
        steps, batch = epoch_steps(sum(sizes), self.batch_size, self.world)
        split = partial(_epoch_shards, counts=sizes, steps=steps, batch=batch, world=self.world)
        return _epoch(order, [split], self.source, partial(self.render, epoch=epoch), self.seed, epoch,
                      self.shuffle_buffer)


def train_pipeline(urls: list[str], store: FeatureStore, data_config: dict, cfg: LoaderConfig, seed: int,
                   epoch: int = 0, counts: dict[str, int] | None = None, cuda: bool = False,
                   soft_labels: bool = False, fresh_scale: tuple[float, float] | None = None) -> DataLoader:
    """This rank's training batches (``epoch_steps`` per epoch, of ``batch_size / world`` samples): ``key``,
    ``image`` (uint8), ``label``, ``view``, ``feature`` and (stores of full logits) ``logits``; a derived store's
    logits are one matmul of the batch's features where the student trains (`gendd_pipe.distill.train`). It serves
    ``epoch`` until ``loader.dataset.set_epoch`` selects another. ``counts`` are the shards' sample counts
    (`check_shards`, which runs when they are not given).

    Images are the store's training views (views 1..V-1, or all V with ``cfg.eval_view``) replayed with the
    store's renderer and interpolation, so they are the teacher's pixels at the student's size. With
    ``fresh_scale``, each epoch draws a new random-resized crop of that scale per image instead (the store's
    aspect range and flip probability, seeded by (seed, epoch, key)), and a batch holds ``key``, ``image``,
    ``label`` (and a soft ``target``) alone: the path of training that needs no teacher output."""
    renderer = renderer_of(store.manifest)
    create_renderer(renderer)  # a store naming a renderer this version lacks fails here, in one line
    counts = counts or check_shards(store, urls)
    if cfg.views is not None and cfg.views > store.num_views:
        raise GenddError(f"{public_url(store.url)}: loader.views {cfg.views}: the store has {store.num_views} views per "
                         f"image; use at most {store.num_views}")
    if fresh_scale is None and not cfg.eval_view and (cfg.views or store.num_views) < 2:
        raise GenddError(f"{public_url(store.url)}: the store has one view per image, its eval view, which training "
                         "leaves out; extract more views or set loader.eval_view: true")
    fresh = None
    if fresh_scale is not None:
        stored = store.manifest["views"]
        fresh = ViewConfig(scale=fresh_scale, ratio=tuple(stored["ratio"]), hflip=stored["hflip"], seed=seed,
                           renderer=renderer)
    world = wds.utils.pytorch_worker_info()[1]
    _, batch = epoch_steps(sum(counts.values()), cfg.batch_size, world)  # a batch that cannot divide fails here
    mixed = is_mixed_store(store.manifest)
    if mixed:
        log.info(_held_per_worker(urls, store, counts))
    num_classes = store.manifest["teacher"]["num_classes"]
    soft = soft_labels and (mixed or cfg.label_smoothing > 0)
    targets = {"num_classes": num_classes, "smoothing": cfg.label_smoothing} if soft else None
    replay = Replay(store.manifest, data_config)
    if fresh is None:
        render = partial(_render_train, replay=replay, seed=seed, targets=targets, views=cfg.views,
                         with_eval_view=cfg.eval_view)
    else:
        render = partial(_render_fresh, replay=replay, views=fresh, targets=targets)
    source = partial(_joined, store_url=store.url, skipped=_skipped_keys(store), verify=cfg.verify)
    epochs = TrainEpochs(list(urls), counts, cfg.batch_size, world, seed, cfg.shuffle_buffer, source, render)
    return _loader(EpochStream(epochs, epoch), batch, cfg.num_workers, cuda, drop_last=True)


def _held_per_worker(urls: list[str], store: FeatureStore, counts: dict[str, int]) -> str:
    """What each loader worker of a mixed store holds in memory at once: the image shard it reads, encoded (a
    row's partner may be any sample of it), and that shard's teacher features, for the largest of ``urls``
    (the features' size from the shards' sample ``counts`` and the manifest, without opening a shard)."""
    images = max(fs.size(path) for fs, path in (fsspec.core.url_to_fs(u) for u in urls))
    width = (1 if is_int8(store.manifest) else 2) * store.manifest["teacher"]["num_features"]  # int8 or float16
    rows = max(counts.values()) * store.num_views * width
    return (f"mixed views: each loader worker holds one image shard (encoded, up to {images / 2**20:.1f} MiB) and "
            f"its teacher features (up to {rows / 2**20:.1f} MiB) in memory, for partner lookups")


def _images(urls, by_rank: bool = False):
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
    with _naming_the_sample(item["url"], sample):
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
        partial(_images, by_rank=not whole),
        partial(_each, fn=partial(_render_eval, data_config=data_config)),
    )
    return _loader(pipeline, batch_size, num_workers, cuda)


def _render_augmented(item: dict, data_config: dict, views: ViewConfig, epoch: int) -> dict:
    sample: Sample = item["sample"]  # decoded by the renderer
    view = random_view(*sample.image.size, views, seeds.rng(views.seed, f"{epoch}:{sample.key}", 0))
    with _naming_the_sample(item["url"], sample):
        image = render_pixels(views.renderer, sample, view[None], data_config)[0]
    return {"image": image, "label": sample.label}


def _augmented_epoch(epoch: int, urls: list[str], counts: dict[str, int], batch_size: int, data_config: dict,
                     views: ViewConfig, shuffle_buffer: int):
    order = epoch_order(urls, views.seed, epoch)
    sizes = [counts[u] for u in order]
    steps, _ = epoch_steps(sum(sizes), batch_size, 1)
    return _epoch(order, [partial(_epoch_shards, counts=sizes, steps=steps, batch=batch_size, world=1)], _images,
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
    return _loader(stream, batch_size, num_workers, cuda, drop_last=True)
