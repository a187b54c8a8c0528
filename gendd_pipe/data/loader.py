"""Streaming images beside their cached teacher outputs: the student's WebDataset loaders.

`train_pipeline` is a webdataset pipeline over the image shards. For each shard a
worker opens, it reads the matching feature shard from the store as one block
(`FeatureStore.read_shard`, checked against its checksums) and joins sample by sample on the key, so there are
no per-sample random reads of Zarr chunks. Each sample then picks one of its
cached views and re-applies that view's crop and flip to the source image at the
student's input size, with the renderer the store was extracted with: the student
sees the pixels the teacher saw.

Shards are shuffled per epoch, samples pass a shuffle buffer, and shards are
split by node (torchrun rank) and by DataLoader worker. Every random choice
derives from (seed, epoch), so an epoch replays identically after a resume.

`eval_pipeline` streams images alone (the eval view), for validation and for
fitting a linear probe; `augmented_pipeline` streams images with a fresh random
view per (seed, epoch, key), for fine-tuning a teacher before extraction.
"""

from __future__ import annotations

import hashlib
import random
from functools import partial

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from gendd_pipe.config import NonNegativeInt, PositiveInt, configclass
from gendd_pipe.data.render import create_renderer, model_input
from gendd_pipe.data.shards import Sample, ShardReader, Skipped, shard_name
from gendd_pipe.data.views import ViewConfig, eval_view, random_view, render_view, to_tensor, view_rng
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.store.format import derive_logits, renderer_of
from gendd_pipe.store.reader import FeatureStore


@configclass
class LoaderConfig:
    """How samples are streamed to the student."""

    batch_size: PositiveInt = 128  # samples per step (per process under torchrun)
    shuffle_buffer: PositiveInt = 1000  # samples held in the shuffle buffer
    num_workers: NonNegativeInt = 0  # DataLoader worker processes (0 loads in the training process)
    verify: bool = True  # check feature shards against their checksums, image shards against their sha256


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


def _joined(urls, store_url: str, skipped: dict[str, set[str]], verify: bool = True):
    """Pipeline stage: ``{"url": ...}`` dicts -> joined samples with their cached teacher outputs."""
    store = FeatureStore.open(store_url)
    for item in urls:
        url = item["url"]
        name = shard_name(url)
        block = store.read_shard(name, verify)
        source = store.shard(name).attrs.get("source_sha256") if verify else None
        derived = {"head": store.head()} if store.logits_mode == "derived" else {}  # the chosen view's, later
        for sample, row in join_shard(url, block, skipped.get(name, set()), source):
            yield {"url": url, "sample": sample, "views": block["views"][row], "features": block["features"][row],
                   **({"logits": block["logits"][row]} if "logits" in block else derived)}


def _each(src, fn):
    """Pipeline stage: ``fn`` applied to every item (plain, so no bookkeeping keys are added)."""
    for item in src:
        yield fn(item)


def view_choice(seed: int, epoch: int, key: str, count: int) -> int:
    """Which cached view a sample uses in an epoch: uniform, from (seed, epoch, key)."""
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % count


def _render_train(item: dict, data_config: dict, renderer: str, seed: int, epoch: int) -> dict:
    sample: Sample = item["sample"]
    v = view_choice(seed, epoch, sample.key, len(item["views"]))
    try:
        image = model_input(renderer, sample, item["views"][v][None], data_config)[0]
    except ValueError as exc:  # the image decoded at extraction, so these are other bytes
        raise GenddError(f"{public_url(item['url'])}: sample {sample.key}: {exc}") from exc
    out = {"key": sample.key, "image": image, "label": sample.label, "view": v,
           "feature": torch.from_numpy(item["features"][v].astype(np.float32))}
    if "logits" in item:
        out["logits"] = torch.from_numpy(item["logits"][v].astype(np.float32))
    elif "head" in item:  # logits mode derived: f @ W.T + b of this view alone
        out["logits"] = torch.from_numpy(derive_logits(item["features"][v], *item["head"]))
    return out


def _epoch_loader(urls: list[str], source, render, seed: int, epoch: int, batch_size: int, shuffle_buffer: int,
                  num_workers: int) -> DataLoader:
    """One training epoch: shards shuffled and samples buffer-shuffled from (seed, epoch), split by node and
    worker, ``source`` turning shard URLs into samples and ``render`` each sample into tensors."""
    order = list(urls)
    random.Random(f"{seed}:{epoch}:shards").shuffle(order)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(order),
        wds.split_by_node,
        wds.split_by_worker,
        source,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(f"{seed}:{epoch}:samples")),
        partial(_each, fn=render),
    )
    return DataLoader(pipeline, batch_size=batch_size, num_workers=num_workers, drop_last=True)


def train_pipeline(urls: list[str], store: FeatureStore, data_config: dict, cfg: LoaderConfig, seed: int,
                   epoch: int) -> DataLoader:
    """One epoch of training batches: ``key``, ``image``, ``label``, ``view``, ``feature`` and (full stores)
    ``logits``."""
    renderer = renderer_of(store.manifest)
    create_renderer(renderer)  # a store naming a renderer this version lacks fails here, in one line
    return _epoch_loader(urls, partial(_joined, store_url=store.url, skipped=_skipped_keys(store), verify=cfg.verify),
                         partial(_render_train, data_config=data_config, renderer=renderer, seed=seed, epoch=epoch),
                         seed, epoch, cfg.batch_size, cfg.shuffle_buffer, cfg.num_workers)


def _images(urls):
    for item in urls:
        for sample in ShardReader(item["url"], on_error="fail"):
            yield sample


def _render_eval(sample: Sample, data_config: dict) -> dict:
    size = data_config["input_size"][1:]
    view = eval_view(*sample.image.size, size, data_config["crop_pct"], data_config.get("crop_mode", "center"))
    image = render_view(sample.image, view, size, data_config["interpolation"])
    return {"image": to_tensor(image, data_config["mean"], data_config["std"]), "label": sample.label}


def eval_pipeline(urls: list[str], data_config: dict, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of ``image`` (the eval view: resize + center crop) and ``label``, in shard order."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.split_by_worker,
        _images,
        partial(_each, fn=partial(_render_eval, data_config=data_config)),
    )
    return DataLoader(pipeline, batch_size=batch_size, num_workers=num_workers)


def _render_augmented(sample: Sample, data_config: dict, views: ViewConfig, epoch: int) -> dict:
    view = random_view(*sample.image.size, views, view_rng(views.seed, f"{epoch}:{sample.key}", 0))
    return {"image": model_input(views.renderer, sample, view[None], data_config)[0], "label": sample.label}


def augmented_pipeline(urls: list[str], data_config: dict, views: ViewConfig, batch_size: int, epoch: int,
                       shuffle_buffer: int = 1000, num_workers: int = 0) -> DataLoader:
    """One epoch of ``image`` (a random-resized crop drawn from (views.seed, epoch, key)) and ``label`` batches,
    shards and samples shuffled from (views.seed, epoch)."""
    return _epoch_loader(urls, _images, partial(_render_augmented, data_config=data_config, views=views, epoch=epoch),
                         views.seed, epoch, batch_size, shuffle_buffer, num_workers)
