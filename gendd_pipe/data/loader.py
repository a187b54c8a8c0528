"""The student's training stream: images beside their cached teacher outputs.

`train_pipeline` is a webdataset pipeline over the image shards. For each shard a
worker opens, it reads the matching feature shard from the store as one block
(`FeatureStore.read_shard`, checked against its checksums) and joins sample by
sample on the key (`JoinedRow`), so there are no per-sample random reads of Zarr
chunks. Each sample then picks one of its cached training views (view 0, the eval
view, only with ``eval_view``) and replays it (`Replay`: the view's crop and flip,
with the renderer and interpolation the store was extracted with, then any stored
color jitter, RandAugment draw and mix) at the student's input size: the student
sees the pixels the teacher saw, beside the teacher outputs the store gives for
that view (`FeatureStore.teacher_outputs`). With ``fresh_scale`` it draws a new
random crop per epoch instead and reads no teacher output (GenDD's stage 1).

Epochs are split among ranks and workers, and served by one persistent
DataLoader, as every stream is (`gendd_pipe.data.streams`); samples pass a
shuffle buffer. Every random choice derives from (seed, epoch) through
`gendd_pipe.seeds`, so an epoch replays identically after a resume, and alike
with any number of workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import fsspec
import numpy as np
import torch
import webdataset as wds
from pydantic import Field
from torch.utils.data import DataLoader

from gendd_pipe import seeds
from gendd_pipe.config import NonNegativeInt, PositiveInt, configclass
from gendd_pipe.data.augment import NO_MIX, is_mixed, mixed_target
from gendd_pipe.data.render import create_renderer
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample, ShardReader, Skipped, shard_name
from gendd_pipe.data.streams import (EpochStream, data_loader, epoch_order, epoch_pipeline, epoch_shards,
                                     epoch_steps, naming_the_sample)
from gendd_pipe.data.views import ViewConfig, random_view
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


@dataclass
class JoinedRow:
    """A sample of an image shard beside its row of the feature shard.

    Attributes:
        url: The image shard.
        sample: The sample, opened (decoded by the renderer when it renders).
        row: Its row in the feature shard.
        block: The feature shard's arrays (`FeatureStore.read_shard`).
        store: The store, which says what a view's teacher outputs are (None: a live teacher's row, whose block
            holds the views alone).
        partners: A mixed store's samples of the whole shard, by row (a view's partner may be any of them).
    """

    url: str
    sample: Sample
    row: int
    block: dict[str, np.ndarray]
    store: FeatureStore | None
    partners: list[Sample] | None = None

    @property
    def views(self) -> dict[str, np.ndarray]:
        """The arrays that make the pixels of this row's views (`VIEW_ARRAYS`: views, and jitter, augment, mix)."""
        return {k: self.block[k][self.row] for k in VIEW_ARRAYS if k in self.block}

    def teacher(self, view: int) -> dict[str, torch.Tensor]:
        """The teacher's outputs of one of the views, float32 tensors (`FeatureStore.teacher_outputs`)."""
        return {k: torch.from_numpy(v) for k, v in self.store.teacher_outputs(self.block, self.row, view).items()}


def _joined(urls, store_url: str, skipped: dict[str, set[str]], verify: bool = True, epoch: int = 0):
    """Pipeline stage: ``{"url": ..., "rows": (first, end)}`` dicts -> a `JoinedRow` for each of those rows (the
    same in every ``epoch``). A store with mixed views keeps each shard's samples (encoded) in memory, as
    ``partners``, since a row's partner may be any row of its shard."""
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


def _render_train(item: JoinedRow, replay: Replay, seed: int, epoch: int, targets: dict | None = None,
                  views: int | None = None, with_eval_view: bool = False, teacher: Replay | None = None) -> dict:
    """A joined row's sample at one of its views, picked from (seed, epoch, key), with the teacher's outputs of
    that view from the store, or with ``teacher`` (a live teacher's `Replay`) the view's pixels at the teacher's
    input size, ``teacher_image``, for the teacher to run on where the student trains (and the soft ``target``
    where ``targets`` asks for one)."""
    sample, row = item.sample, item.views
    count = views or len(row["views"])  # (train_pipeline refuses more views than the store has)
    augmented = any(k in row for k in ("jitter", "augment", "mix"))  # views 1..V-1 are augmented; 0 is the eval view
    first = 0 if with_eval_view and not augmented else 1
    v = first + seeds.index(count - first, seed, epoch, sample.key)  # uniform, from (seed, epoch, key)
    with naming_the_sample(item.url, sample):  # the image decoded at extraction, so these are other bytes
        image = replay.views(sample, row, item.partners, item.block, [v])[0]
    out = {"key": sample.key, "image": image, "label": sample.label, "view": v}
    if teacher is None:
        out.update(item.teacher(v))
    elif teacher.size == replay.size:  # the same pixels: both replay with the store's interpolation
        out["teacher_image"] = image
    else:
        with naming_the_sample(item.url, sample):
            out["teacher_image"] = teacher.views(sample, row, item.partners, item.block, [v])[0]
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
    with naming_the_sample(item.url, sample):
        image = replay.base(sample, view[None])[0]
    out = {"key": sample.key, "image": image, "label": sample.label}
    if targets is not None:  # label smoothing, as the cached path's soft labels (no partner: nothing is mixed)
        out["target"] = mixed_target(sample.label, sample.label, 1.0, targets["num_classes"], targets["smoothing"])
    return out


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
    source: Callable  # pipeline stage: this part's ``{"url", "rows"}`` and the epoch -> `JoinedRow`
    render: Callable  # a `JoinedRow` and the epoch -> the sample's tensors

    def __call__(self, epoch: int):
        order = epoch_order(self.urls, self.seed, epoch)
        sizes = [self.counts[shard_name(u)] for u in order]
        steps, batch = epoch_steps(sum(sizes), self.batch_size, self.world)
        split = partial(epoch_shards, counts=sizes, steps=steps, batch=batch, world=self.world)
        return epoch_pipeline(order, [split], partial(self.source, epoch=epoch), partial(self.render, epoch=epoch),
                              self.seed, epoch, self.shuffle_buffer)


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
    counts = counts or check_shards(store, urls)
    if cfg.views is not None and cfg.views > store.num_views:
        raise GenddError(f"{public_url(store.url)}: loader.views {cfg.views}: the store has {store.num_views} views per "
                         f"image; use at most {store.num_views}")
    if is_mixed_store(store.manifest):
        log.info(_held_per_worker(urls, store, counts))
    source = partial(_joined, store_url=store.url, skipped=_skipped_keys(store), verify=cfg.verify)
    return rows_pipeline(urls, counts, store.manifest, store.num_views, source, data_config, cfg, seed, epoch, cuda,
                         soft_labels, fresh_scale, where=public_url(store.url))


def rows_pipeline(urls: list[str], counts: dict[str, int], manifest: dict, num_views: int, source: Callable,
                  data_config: dict, cfg: LoaderConfig, seed: int, epoch: int = 0, cuda: bool = False,
                  soft_labels: bool = False, fresh_scale: tuple[float, float] | None = None,
                  teacher: Replay | None = None, where: str = "the store") -> DataLoader:
    """`train_pipeline` over the rows that ``source`` yields (a pipeline stage: ``{"url", "rows"}`` and the epoch
    -> `JoinedRow`), whose views are drawn and rendered as ``manifest`` says, ``num_views`` per row; with
    ``teacher`` (a live teacher's `Replay`) a batch carries each view's ``teacher_image`` in place of the store's
    outputs (`_render_train`)."""
    renderer = renderer_of(manifest)
    create_renderer(renderer)  # a store naming a renderer this version lacks fails here, in one line
    if fresh_scale is None and not cfg.eval_view and (cfg.views or num_views) < 2:
        raise GenddError(f"{where}: one view per image, its eval view, which training leaves out; extract more "
                         "views or set loader.eval_view: true")
    fresh = None
    if fresh_scale is not None:
        stored = manifest["views"]
        fresh = ViewConfig(scale=fresh_scale, ratio=tuple(stored["ratio"]), hflip=stored["hflip"], seed=seed,
                           renderer=renderer)
    world = wds.utils.pytorch_worker_info()[1]
    _, batch = epoch_steps(sum(counts.values()), cfg.batch_size, world)  # a batch that cannot divide fails here
    num_classes = manifest["teacher"]["num_classes"]
    soft = soft_labels and (is_mixed_store(manifest) or cfg.label_smoothing > 0)
    targets = {"num_classes": num_classes, "smoothing": cfg.label_smoothing} if soft else None
    replay = Replay(manifest, data_config)
    if fresh is None:
        render = partial(_render_train, replay=replay, seed=seed, targets=targets, views=cfg.views,
                         with_eval_view=cfg.eval_view, teacher=teacher)
    else:
        render = partial(_render_fresh, replay=replay, views=fresh, targets=targets)
    epochs = TrainEpochs(list(urls), counts, cfg.batch_size, world, seed, cfg.shuffle_buffer, source, render)
    return data_loader(EpochStream(epochs, epoch), batch, cfg.num_workers, cuda, drop_last=True)


def _held_per_worker(urls: list[str], store: FeatureStore, counts: dict[str, int]) -> str:
    """What each loader worker of a mixed store holds in memory at once: the image shard it reads, encoded (a
    row's partner may be any sample of it), and that shard's teacher features, for the largest of ``urls``
    (the features' size from the shards' sample ``counts`` and the manifest, without opening a shard)."""
    images = max(fs.size(path) for fs, path in (fsspec.core.url_to_fs(u) for u in urls))
    width = (1 if is_int8(store.manifest) else 2) * store.manifest["teacher"]["num_features"]  # int8 or float16
    rows = max(counts.values()) * store.num_views * width
    return (f"mixed views: each loader worker holds one image shard (encoded, up to {images / 2**20:.1f} MiB) and "
            f"its teacher features (up to {rows / 2**20:.1f} MiB) in memory, for partner lookups")


