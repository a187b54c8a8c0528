"""One extraction task: an input shard through the teacher into the feature shard of the same name.

`extract_shard` builds the teacher once per process (`cached_teacher`), streams the shard, draws every
view of every image (`gendd_pipe.data.views`, and for an augmented store its RandAugment, color jitter and mix
draws, `gendd_pipe.data.plan`), renders them with the store's renderer on threads ahead of the forward, and writes the
arrays the store's `shard_schema` declares, chunk by chunk on a writer thread, ``complete`` last. It runs as a
Dask task or in the driver's process (`gendd_pipe.extract`); it knows nothing of leases or of other shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, field
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from gendd_pipe.cluster import report_progress, task_runtime
from gendd_pipe.config import PositiveInt, configclass
from gendd_pipe.data.augment import AugmentConfig, fill_color, parse_randaugment
from gendd_pipe.data.plan import plan_views
from gendd_pipe.data.render import create_renderer, prefetched
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample, ShardReader, Skipped, shard_name
from gendd_pipe.data.views import ViewConfig, sample_views
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.models.teacher import Teacher, TeacherConfig, cached_teacher
from gendd_pipe.runtime import RuntimeConfig, normalize_pixels
from gendd_pipe.storage import storage_errors
from gendd_pipe.store.format import (CHECKSUMS, SHARDS, VIEWS_ATTR, checksum, format_version, recorded_source,
                                     shard_schema, shard_views)
from gendd_pipe.store.writer import RESUME, ShardWriter, is_complete, open_root

log = logging.getLogger(__name__)


@configclass
class ShardConfig:
    """What one extraction task needs: the teacher, how views are drawn and rendered, and how rows are stored
    (the `gendd_pipe.extract.ExtractConfig` fields of the same names)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: PositiveInt = 64
    chunk_size: PositiveInt = 256
    clevel: Annotated[int, Field(ge=0, le=9)] = 5
    on_error: Literal["fail", "skip"] = "fail"
    threads: PositiveInt | None = None
    render_threads: PositiveInt | None = None
    int8_floor: Annotated[float, Field(gt=0, le=1)] = 0.999
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def augment_section(teacher: Teacher, augment: AugmentConfig) -> dict:
    """The manifest's ``augment`` section of an augmented store (none for a plain one): the config (without
    ``color_jitter`` when it is off, as version-3 stores were written), the fill of geometric ops, and the
    RandAugment op names the stored op indices refer to."""
    if not augment.active:
        return {}
    section = asdict(augment)
    if not section["color_jitter"]:
        del section["color_jitter"]
    fill = fill_color(teacher.data_config["mean"])
    ops, layers = [], 0
    if augment.randaugment:
        ops_of = parse_randaugment(augment.randaugment, teacher.input_hw, fill, teacher.data_config["interpolation"])
        ops, layers = [op.name for op in ops_of.ops], ops_of.num_layers
    return {"augment": {**section, "fill": list(fill), "ops": ops, "layers": layers}}


def view_manifest(teacher: Teacher, views: ViewConfig, augment: AugmentConfig) -> dict:
    """The manifest sections that fix a view's pixels and its teacher outputs: ``format_version`` (3 augmented, 4
    with color jitter, else 2), ``augment`` (augmented stores only), ``teacher``, ``preprocessing`` and ``views``."""
    section = augment_section(teacher, augment)
    return {"format_version": format_version(section.get("augment", {})), **section, **teacher.manifest(),
            "views": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(views).items()}}


def _rendered(reader: ShardReader, teacher: Teacher, cfg: ShardConfig, manifest: dict) -> Iterator:
    """Each sample of ``reader`` with its views (V, 5) and their pixels (V, 3, H, W), or its `Skipped` record,
    rendered on ``cfg.render_threads`` threads ahead of the forward: normalized floats for a CPU teacher,
    uint8 for a GPU one (normalized on the device)."""
    threads, ahead = cfg.render_threads or cfg.threads or 1, 2 * _images_per_batch(cfg)
    if cfg.augment.active:
        return _rendered_augmented(reader, teacher, cfg, Replay(manifest, teacher.data_config), threads, ahead)
    dc, size = teacher.data_config, teacher.input_hw
    render = create_renderer(cfg.views.renderer)
    on_cpu = teacher.device.type == "cpu"  # then these threads normalize too; a GPU gets bytes, normalized there

    def one(item: Sample | Skipped):
        if not isinstance(item, Sample):
            return item
        views = sample_views(item.key, *item.image.size, cfg.views, size, dc["crop_pct"], dc.get("crop_mode", "center"))
        try:
            pixels = render(item, views, size, dc["interpolation"])  # (V, 3, H, W) uint8, on the CPU (as the
            # student's loader renders them)
        except ValueError as exc:  # the image fails to decode: the reader's rule (fail, or skip and record)
            return reader.skip(item.key, str(exc))
        return item, {"views": views}, normalize_pixels(pixels, dc["mean"], dc["std"]) if on_cpu else pixels

    return prefetched(one, reader, threads, ahead)


def _decodable(reader: ShardReader, threads: int) -> Iterator[Sample | Skipped]:
    """The samples of ``reader`` whose images decode (checked on threads), and the `Skipped` records of the rest."""
    def check(item: Sample | Skipped):
        if isinstance(item, Sample):
            try:
                item.rgb()
            except ValueError as exc:
                return reader.skip(item.key, str(exc))
        return item

    return prefetched(check, reader, threads, 4 * threads)


def _rendered_augmented(reader: ShardReader, teacher: Teacher, cfg: ShardConfig, replay: Replay, threads: int,
                        ahead: int):
    """`_rendered` for an augmented store: the shard is read whole first (its decodable samples are the rows that
    partners are drawn among), then each row's views are replayed (`Replay`) with their partners'."""
    skipped, samples = [], []
    for item in _decodable(reader, threads):
        (samples if isinstance(item, Sample) else skipped).append(item)
    if cfg.augment.mixing and len(samples) < 2:
        raise GenddError(f"{public_url(reader.url)}: {len(samples)} readable sample(s); a mixed view needs a partner "
                         "from the same shard (put more samples in each shard, or set augment.mixup and "
                         "augment.cutmix to 0)")
    plan = plan_views(samples, cfg.views, cfg.augment, replay, teacher.data_config)
    dc, on_cpu = teacher.data_config, teacher.device.type == "cpu"

    def one(i: int):
        row = {k: a[i] for k, a in plan.items()}
        pixels = replay.views(samples[i], row, samples, plan)
        return samples[i], row, normalize_pixels(pixels, dc["mean"], dc["std"]) if on_cpu else pixels

    yield from skipped
    yield from prefetched(one, range(len(samples)), threads, ahead)


def _images_per_batch(cfg: ShardConfig) -> int:
    return max(1, cfg.batch_size // cfg.views.count)


def _batches(rendered: Iterator, cfg: ShardConfig, on_skip: Callable) -> Iterator[list]:
    """Rendered samples grouped into teacher batches of whole images; skipped ones go to ``on_skip``."""
    pending = []
    for item in rendered:
        if isinstance(item, Skipped):
            on_skip(item)
            continue
        pending.append(item)
        if len(pending) == _images_per_batch(cfg):
            yield pending
            pending = []
    if pending:
        yield pending


def _forward(teacher: Teacher, batch: list, logits: dict) -> dict[str, np.ndarray]:
    """One batch through the teacher -> the shard's rows (keys, labels, the view arrays, features and the
    logits arrays), as computed: the writer stores them in the schema's dtypes."""
    pixels = torch.cat([p for _, _, p in batch])  # (B*V, 3, H, W)
    if teacher.device.type == "cuda" and pixels.device.type == "cpu":
        pixels = pixels.pin_memory()  # so the copy to the device does not block
    features, out = teacher(pixels)  # (B*V, D), (B*V, C) float32
    n, v = len(batch), len(batch[0][1]["views"])
    rows = {"keys": np.array([s.key for s, _, _ in batch], dtype=str),
            "labels": np.array([s.label for s, _, _ in batch], dtype=np.int64),
            **{key: np.stack([arrays[key] for _, arrays, _ in batch]) for key in batch[0][1]},  # views, augment, mix
            "features": features.reshape(n, v, -1).numpy()}  # (B, V, D)
    out = out.reshape(n, v, -1)  # (B, V, C)
    if logits["mode"] == "full":
        rows["logits"] = out.numpy()
    elif logits["mode"] == "topk":
        values, indices = out.topk(logits["k"], dim=-1)  # (B, V, k)
        rows["topk_values"], rows["topk_indices"] = values.numpy(), indices.numpy()
    return rows


def extract_shard(url: str, store: str, manifest: dict, cfg: ShardConfig, devices: tuple[str, ...] = (),
                  source: str | None = None, report: Callable[[int], None] = report_progress) -> dict:
    """Extract one input shard into the feature shard of the same name, its arrays those of the store's
    `shard_schema`. Runs as one Dask task (or in the driver's process).

    Reading, decoding and rendering run on threads ahead of the forward (`_rendered`), and each chunk of rows
    is compressed and written on a thread of its own (`ShardWriter`) while the next batches run.

    Args:
        url: The input shard.
        store: The store's path or URL; its root and ``manifest`` written already.
        manifest: The store's manifest: what the shard holds.
        cfg: How the teacher runs and the views are drawn.
        devices: The devices of a local cluster's workers, by worker name (`worker_devices`); empty runs on
            ``cfg.runtime.device``.
        source: The input shard as the store records it (`recorded_source` in the driver's directory; default:
            in this process's).
        report: Told the number of images of each batch written.

    Returns:
        The shard's manifest entry plus its skipped samples.
    """
    name = shard_name(url)
    where = f"write feature shard {name}"
    with storage_errors(store, where, hint=RESUME):
        root = open_root(store)
    if is_complete(root, name, manifest["views"]["count"]):  # run again by Dask because the worker holding its
        log.debug("feature shard %s: complete already, left as it is", name)  # result was lost: committed
        return _entry(name, dict(root[f"{SHARDS}/{name}"].attrs))
    teacher = cached_teacher(cfg.teacher, task_runtime(cfg.runtime, devices), cfg.threads)
    if is_complete(root, name):
        with storage_errors(store, where, hint=RESUME):
            return grow_shard(root[f"{SHARDS}/{name}"], url, store, manifest, cfg, teacher, report)
    reader = ShardReader(url, cfg.on_error, teacher.num_classes, decode=False)
    skipped: list[dict] = []
    with storage_errors(store, where, hint=RESUME):
        writer = ShardWriter(store, name, shard_schema(manifest), cfg.chunk_size, cfg.clevel, cfg.int8_floor)
    try:
        n = 0
        for batch in _batches(_rendered(reader, teacher, cfg, manifest), cfg, lambda s: skipped.append(s.record())):
            rows = _forward(teacher, batch, manifest["logits"])
            with storage_errors(store, where, hint=RESUME):
                writer.append(rows)
            n += len(batch)
            report(len(batch))
        attrs = {"source": source or recorded_source(url), "source_sha256": reader.sha256, "count": n,
                 "skipped": skipped, VIEWS_ATTR: manifest["views"]["count"]}
        with storage_errors(store, where, hint=RESUME):
            attrs = writer.commit(attrs)
    finally:
        writer.close()
    log.debug("feature shard %s: %d samples, %d skipped, from %s", name, n, len(skipped), public_url(url))
    return _entry(name, attrs)


def grow_shard(group, url: str, store: str, manifest: dict, cfg: ShardConfig, teacher: Teacher,
               report: Callable[[int], None] = report_progress) -> dict:
    """Add to a complete feature shard the views its rows lack, up to the manifest's count N: views ``V..N-1``
    drawn, rendered and run through the teacher as an N-view extraction does them (`plan_views`), so the shard
    then holds what one of N views would. Its stored views keep their bytes: its per-view arrays grow along the
    view axis (new chunks), their checksums are made again over all N, and its ``views`` attribute, written as V
    before and as N last, says which views are whole, so a shard killed midway is grown again from its V views
    and readers read its first V (`FeatureStore.read_shard`) until the store's manifest says N.

    Returns:
        The shard's manifest entry, as `extract_shard` does.
    """
    name, have, want = group.basename, shard_views(group), manifest["views"]["count"]
    schema, sums = shard_schema(manifest), dict(group.attrs.get(CHECKSUMS) or {})
    stored = {key: group[key][:, :have] for key, spec in schema.items() if spec.per_view}
    for key, data in stored.items():
        if key in sums and checksum(data) != sums[key]:
            raise GenddError(f"{public_url(store)}: shard {name}: array {key} does not match its checksum, so it "
                             "cannot grow (gendd-pipe verify names what is damaged; re-extract into a new --out)")
    keys = group["keys"][...].tolist()
    reader = ShardReader(url, "skip", teacher.num_classes, decode=False)
    rows = set(keys)
    samples = [s for s in reader if isinstance(s, Sample) and s.key in rows]
    if [s.key for s in samples] != keys or reader.sha256 != group.attrs["source_sha256"]:
        raise GenddError(f"{public_url(url)}: not the shard feature shard {name} was extracted from (its samples or "
                         f"bytes differ: sha256 {reader.sha256[:12]}, the store's {group.attrs['source_sha256'][:12]}); "
                         "pass the original shard to grow it")
    which = list(range(have, want))
    replay, dc, on_cpu = Replay(manifest, teacher.data_config), teacher.data_config, teacher.device.type == "cpu"
    plan = plan_views(samples, cfg.views, cfg.augment, replay, dc, which)

    def one(i: int):
        row = {k: a[i] for k, a in plan.items()}
        pixels = replay.views(samples[i], row, samples, plan)
        return samples[i], row, normalize_pixels(pixels, dc["mean"], dc["std"]) if on_cpu else pixels

    per_batch, grown, batch = max(1, cfg.batch_size // len(which)), {key: [] for key in stored}, []
    threads = cfg.render_threads or cfg.threads or 1
    for i, item in enumerate(prefetched(one, range(len(samples)), threads, 2 * per_batch)):
        batch.append(item)
        if len(batch) == per_batch or i == len(samples) - 1:
            computed = _forward(teacher, batch, manifest["logits"])
            for key in grown:
                grown[key].append(computed[key].astype(schema[key].dtype, copy=False))
            report(len(batch))
            batch = []
    group.attrs[VIEWS_ATTR] = have  # before the arrays grow: their first `have` views are the whole ones
    for key, old in stored.items():
        new = np.concatenate(grown[key]) if grown[key] else np.zeros((0, want - have, *old.shape[2:]), old.dtype)
        data = np.concatenate([old, new], axis=1)
        array = group[key]
        array.resize(data.shape)
        array[:, have:] = data[:, have:]
        sums[key] = checksum(data)
    group.attrs.update({VIEWS_ATTR: want, CHECKSUMS: sums})
    log.debug("feature shard %s: grown from %d to %d views", name, have, want)
    return _entry(name, dict(group.attrs))


def _entry(name: str, attrs: dict) -> dict:
    """A feature shard's manifest entry plus its skipped samples, from its attrs."""
    return {"name": name, "source": attrs["source"], "count": int(attrs["count"]), "skipped": list(attrs["skipped"]),
            **({"int8_cosine": attrs["int8_cosine"]} if "int8_cosine" in attrs else {})}


