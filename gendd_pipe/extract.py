"""Extraction: run a teacher once over image shards and write a feature store.

One Dask task per input shard (`gendd_pipe.cluster`) builds the teacher once
per worker, streams the shard, renders every view of every image with the
configured renderer (`gendd_pipe.data.render`) on threads ahead of the forward,
and writes one feature shard, chunk by chunk on a writer thread, whose
``complete`` attribute is the commit. The driver writes the manifest and the
teacher head first, skips shards that are already complete (resume), and
finally records the shard list and skipped samples in the manifest.
Everything written derives from the inputs and the config, so a resumed run
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, field, replace
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from gendd_pipe import __version__
from gendd_pipe.cluster import (dask_client, local_devices, report_progress, run_per_shard, split_threads,
                                task_runtime)
from gendd_pipe.config import (NonNegativeInt, OutputDir, OutputFile, PositiveInt, Shards, configclass, narrow,
                               to_dict)
from gendd_pipe.data.augment import (JITTER_FIELDS, MIX_FIELDS, NO_JITTER, NO_MIX, AugmentConfig, draw_jitter, draw_mix,
                                     draw_randaugment, fill_color, no_randaugment, parse_randaugment)
from gendd_pipe.data.render import create_renderer, prefetched
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample, ShardReader, Skipped, expand_urls, shard_name
from gendd_pipe.data.views import ViewConfig, sample_views, view_rng
from gendd_pipe.errors import GenddError
from gendd_pipe.files import file_sha256, public_url, write_json, write_yaml
from gendd_pipe.layout import config_beside
from gendd_pipe.models.teacher import Teacher, TeacherConfig, cached_teacher, create_teacher
from gendd_pipe.runtime import RuntimeConfig, normalize_pixels, resolve_device
from gendd_pipe.storage import explain, storage_errors
from gendd_pipe.store.format import (MANIFEST_ATTR, SHARDS, check_compatible, format_version, logits_spec, parse_logits,
                                     recorded_source)
from gendd_pipe.store.reader import FeatureStore
from gendd_pipe.store.lease import Leases
from gendd_pipe.store.writer import ShardWriter, is_complete, open_root, write_root

log = logging.getLogger(__name__)

POLL_S = 2.0  # seconds between looks at shards another writer holds


@configclass
class ExtractConfig:
    """How a store is extracted. Output-affecting fields are recorded in the manifest."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # RandAugment and mixes drawn per view, replayable
    logits: str = "auto"  # auto (derived where the classifier is linear, else full) | derived | full | topk:K
    batch_size: PositiveInt = 64  # images per teacher forward
    chunk_size: PositiveInt = 256  # samples per Zarr chunk
    clevel: Annotated[int, Field(ge=0, le=9)] = 5  # Blosc zstd level
    on_error: Literal["fail", "skip"] = "fail"  # skip: unreadable samples are recorded in the manifest
    dask_workers: NonNegativeInt = 1  # Dask LocalCluster worker processes; 0 runs in this process
    scheduler: str | None = None  # address of an existing Dask scheduler (overrides dask_workers)
    threads: PositiveInt | None = None  # torch threads per worker; default: cores / dask_workers
    render_threads: PositiveInt | None = None  # threads decoding and rendering ahead of the forward; default: threads
    features_dtype: Literal["float16", "int8"] = "float16"  # int8: lossy, one scale per channel and chunk
    int8_floor: Annotated[float, Field(gt=0, le=1)] = 0.999  # int8: lowest round-trip cosine a view may have
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device and precision (recorded: precision)
    lease_wait: Annotated[float, Field(gt=0)] = 3600.0  # seconds to wait for shards another live extraction holds
    # while none of them completes; then stop with an error (a dead writer's leases expire by themselves)

    @field_validator("logits")
    @classmethod
    def _logits(cls, value: str) -> str:
        if value != "auto":
            try:
                parse_logits(value)
            except GenddError:
                raise ValueError("must be auto, derived, full or topk:K with K >= 1") from None
        return value

    @model_validator(mode="after")
    def _augmentable(self):
        if self.augment.active and self.views.count < 2:
            raise ValueError("augment: views 1..count-1 carry the augmentation (view 0 is the eval view); "
                             "set views.count to 2 or more")
        if self.augment.randaugment and self.views.renderer != "pil":
            raise ValueError("augment.randaugment: timm's RandAugment ops run on Pillow images; use views.renderer pil")
        if self.augment.color_jitter and self.views.renderer != "pil":
            raise ValueError("augment.color_jitter: replayed with torchvision's functions on Pillow images; use "
                             "views.renderer pil")
        return self


def augment_section(teacher: Teacher, cfg: ExtractConfig) -> dict:
    """The manifest's ``augment`` section of an augmented store (none for a plain one): the config (without
    ``color_jitter`` when it is off, as version-3 stores were written), the fill of geometric ops, and the
    RandAugment op names the stored op indices refer to."""
    if not cfg.augment.active:
        return {}
    section = asdict(cfg.augment)
    if not section["color_jitter"]:
        del section["color_jitter"]
    fill = fill_color(teacher.data_config["mean"])
    ops, layers = [], 0
    if cfg.augment.randaugment:
        augment = parse_randaugment(cfg.augment.randaugment, teacher.input_hw, fill,
                                    teacher.data_config["interpolation"])
        ops, layers = [op.name for op in augment.ops], augment.num_layers
    return {"augment": {**section, "fill": list(fill), "ops": ops, "layers": layers}}


def requested_manifest(teacher: Teacher, cfg: ExtractConfig) -> dict:
    """Everything that fixes the bytes of a store, plus an empty shard list. Augmented stores are format
    version 3, or 4 with color jitter (readers that do not replay them refuse them); plain ones stay version 2."""
    augment = augment_section(teacher, cfg)
    return {
        "format_version": format_version(augment.get("augment", {})),
        **augment,
        **teacher.manifest(),
        "views": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.views).items()},
        "logits": parse_logits(cfg.logits),
        "compute": {"precision": cfg.runtime.precision},
        "storage": {"features_dtype": cfg.features_dtype, "codec": "blosc-zstd-bitshuffle", "clevel": cfg.clevel,
                    "chunk_size": cfg.chunk_size, **({"int8_floor": cfg.int8_floor} if cfg.features_dtype == "int8" else {})},
        "shards": [],
        "skipped": [],
        "tool_version": __version__,
    }


def _rendered(reader: ShardReader, teacher: Teacher, cfg: ExtractConfig) -> Iterator:
    """Each sample of ``reader`` with its views (V, 5) and their pixels (V, 3, H, W), or its `Skipped` record,
    rendered on ``cfg.render_threads`` threads ahead of the forward: normalized floats for a CPU teacher,
    uint8 for a GPU one (normalized on the device)."""
    threads, ahead = cfg.render_threads or cfg.threads or 1, 2 * _images_per_batch(cfg)
    if cfg.augment.active:
        return _rendered_augmented(reader, teacher, cfg, threads, ahead)
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


def plan_rows(samples: list[Sample], teacher: Teacher, cfg: ExtractConfig, replay: Replay) -> dict[str, np.ndarray]:
    """Every stored view of a shard's rows: ``views`` (n, V, 5), and ``jitter`` (n, V, 6), ``augment`` (n, V, L, 3)
    (drawn from the RandAugment that ``replay`` applies) and ``mix`` (n, V, 7) as configured, each drawn from
    (seed, key, view);
    view 0 stays the plain eval view."""
    dc, size, v = teacher.data_config, teacher.input_hw, cfg.views.count
    views = np.stack([sample_views(s.key, *s.image.size, cfg.views, size, dc["crop_pct"], dc.get("crop_mode", "center"))
                      for s in samples])
    plan = {"views": views}
    if cfg.augment.color_jitter > 0:
        plan["jitter"] = np.stack([[NO_JITTER] + [draw_jitter(cfg.augment.color_jitter,
                                                              view_rng(cfg.views.seed, f"jitter:{s.key}", k))
                                                  for k in range(1, v)] for s in samples])
    augment = replay.randaugment
    if augment is not None:
        plan["augment"] = np.stack([[no_randaugment(augment.num_layers)] +
                                    [draw_randaugment(augment, view_rng(cfg.views.seed, f"randaugment:{s.key}", k))
                                     for k in range(1, v)] for s in samples])
    if cfg.augment.mixing:
        plan["mix"] = np.stack([[NO_MIX] + [draw_mix(cfg.augment, view_rng(cfg.views.seed, f"mix:{s.key}", k), i,
                                                     len(samples), size) for k in range(1, v)]
                                for i, s in enumerate(samples)])
    return plan


def _rendered_augmented(reader: ShardReader, teacher: Teacher, cfg: ExtractConfig, threads: int, ahead: int):
    """`_rendered` for an augmented store: the shard is read whole first (its decodable samples are the rows that
    partners are drawn among), then each row's views are replayed (`Replay`) with their partners'."""
    skipped, samples = [], []
    for item in _decodable(reader, threads):
        (samples if isinstance(item, Sample) else skipped).append(item)
    if cfg.augment.mixing and len(samples) < 2:
        raise GenddError(f"{public_url(reader.url)}: {len(samples)} readable sample(s); a mixed view needs a partner "
                         "from the same shard (put more samples in each shard, or set augment.mixup and "
                         "augment.cutmix to 0)")
    replay = Replay({"views": asdict(cfg.views), **augment_section(teacher, cfg)}, teacher.data_config)
    plan = plan_rows(samples, teacher, cfg, replay)
    dc, on_cpu = teacher.data_config, teacher.device.type == "cpu"

    def one(i: int):
        row = {k: a[i] for k, a in plan.items()}
        pixels = replay.views(samples[i], row, samples, plan)
        return samples[i], row, normalize_pixels(pixels, dc["mean"], dc["std"]) if on_cpu else pixels

    yield from skipped
    yield from prefetched(one, range(len(samples)), threads, ahead)


def _images_per_batch(cfg: ExtractConfig) -> int:
    return max(1, cfg.batch_size // cfg.views.count)


def _batches(rendered: Iterator, cfg: ExtractConfig, on_skip: Callable) -> Iterator[list]:
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


def _forward(teacher: Teacher, batch: list, logits: dict, int8: bool) -> dict[str, np.ndarray]:
    """One batch through the teacher -> the shard's rows: keys, labels, views, features and logits arrays."""
    pixels = torch.cat([p for _, _, p in batch])  # (B*V, 3, H, W)
    if teacher.device.type == "cuda" and pixels.device.type == "cpu":
        pixels = pixels.pin_memory()  # so the copy to the device does not block
    features, out = teacher(pixels)  # (B*V, D), (B*V, C) float32
    n, v = len(batch), len(batch[0][1]["views"])
    features = features.reshape(n, v, -1).numpy()
    rows = {"keys": np.array([s.key for s, _, _ in batch], dtype=str),
            "labels": np.array([s.label for s, _, _ in batch], dtype=np.int64),
            **{key: np.stack([arrays[key] for _, arrays, _ in batch]) for key in batch[0][1]},  # views, augment, mix
            "features": features if int8 else features.astype(np.float16)}  # int8: quantized per chunk
    out = out.reshape(n, v, -1)
    if logits["mode"] == "full":
        rows["logits"] = out.numpy().astype(np.float16)
    elif logits["mode"] == "topk":
        values, indices = out.topk(logits["k"], dim=-1)
        rows["topk_values"], rows["topk_indices"] = values.numpy().astype(np.float16), indices.numpy().astype(np.int32)
    return rows


def _fields(teacher: Teacher, cfg: ExtractConfig, logits: dict) -> dict[str, tuple[tuple, object]]:
    """Row shape and dtype of every array of a feature shard."""
    v, c = cfg.views.count, teacher.num_classes
    fields = {"keys": ((), str), "labels": ((), np.int64), "views": ((v, 5), np.float32)}
    section = augment_section(teacher, cfg).get("augment", {})
    if cfg.augment.color_jitter > 0:
        fields["jitter"] = ((v, len(JITTER_FIELDS)), np.float32)
    if section.get("randaugment"):
        fields["augment"] = ((v, section["layers"], 3), np.float32)
    if cfg.augment.mixing:
        fields["mix"] = ((v, len(MIX_FIELDS)), np.float32)
    fields["features"] = ((v, teacher.num_features), np.float16)
    if logits["mode"] == "full":
        fields["logits"] = ((v, c), np.float16)
    elif logits["mode"] == "topk":
        fields["topk_values"], fields["topk_indices"] = ((v, logits["k"]), np.float16), ((v, logits["k"]), np.int32)
    return fields


def extract_shard(url: str, store: str, cfg: ExtractConfig, report: Callable[[int], None] = report_progress,
                  devices: tuple[str, ...] = (), source: str | None = None) -> dict:
    """Extract one input shard into the feature shard of the same name. Runs as one Dask task.

    Reading, decoding and rendering run on threads ahead of the forward (`_rendered`), and each chunk of rows
    is compressed and written on a thread of its own (`ShardWriter`) while the next batches run.

    Args:
        devices: The devices of a local cluster's workers, by worker name (`worker_devices`); empty runs on
            ``cfg.runtime.device``.
        source: The input shard as the store records it (`recorded_source` in the driver's directory; default:
            in this process's).

    Returns:
        The shard's manifest entry plus its skipped samples.
    """
    name = shard_name(url)
    with _writing(store, f"feature shard {name}"):
        root = open_root(store)
    if is_complete(root, name):  # run again by Dask because the worker holding its result was lost: committed
        log.debug("feature shard %s: complete already, left as it is", name)
        return _entry(name, dict(root[f"{SHARDS}/{name}"].attrs))
    teacher = cached_teacher(cfg.teacher, task_runtime(cfg.runtime, devices), cfg.threads)
    logits, int8 = parse_logits(cfg.logits), cfg.features_dtype == "int8"
    reader = ShardReader(url, cfg.on_error, teacher.num_classes, decode=False)
    skipped: list[dict] = []
    with _writing(store, f"feature shard {name}"):
        writer = ShardWriter(store, name, _fields(teacher, cfg, logits), cfg.chunk_size, cfg.clevel,
                             cfg.int8_floor if int8 else None)
    try:
        n = 0
        for batch in _batches(_rendered(reader, teacher, cfg), cfg, lambda s: skipped.append(s.record())):
            rows = _forward(teacher, batch, logits, int8)
            with _writing(store, f"feature shard {name}"):
                writer.append(rows)
            n += len(batch)
            report(len(batch))
        attrs = {"source": source or recorded_source(url), "source_sha256": reader.sha256, "count": n, "skipped": skipped}
        with _writing(store, f"feature shard {name}"):
            attrs = writer.commit(attrs)
    finally:
        writer.close()
    log.debug("feature shard %s: %d samples, %d skipped, from %s", name, n, len(skipped), public_url(url))
    return _entry(name, attrs)


def _entry(name: str, attrs: dict) -> dict:
    """A feature shard's manifest entry plus its skipped samples, from its attrs."""
    return {"name": name, "source": attrs["source"], "count": int(attrs["count"]), "skipped": list(attrs["skipped"]),
            **({"int8_cosine": attrs["int8_cosine"]} if "int8_cosine" in attrs else {})}


def extract(patterns: list[str], store: str, cfg: ExtractConfig, progress: bool = True) -> dict:
    """Extract every input shard into ``store``, resuming where a previous run stopped.

    Args:
        patterns: Shard paths, brace patterns or fsspec URLs.
        store: Store path or URL (created if missing).
        cfg: Extraction settings.
        progress: Show a rich progress bar.

    Returns:
        The final manifest.
    """
    from gendd_pipe.progress import ExtractProgress

    urls = expand_urls(patterns)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GenddError(f"two input shards are both named {dup!r}; feature shards are named by file name")
    store = store if "://" in store else os.path.abspath(store)
    devices = local_devices(cfg.runtime, cfg.dask_workers, cfg.scheduler)
    cfg = replace(cfg, threads=split_threads(cfg.threads, len(devices) or cfg.dask_workers, cfg.scheduler))
    device = None if cfg.scheduler else resolve_device(cfg.runtime)  # one this machine lacks fails before any work
    if cfg.dask_workers == 0 and not cfg.scheduler:  # the manifest and head from the teacher the shards run here
        teacher = cached_teacher(cfg.teacher, cfg.runtime, cfg.threads)
    else:  # ... or from one on the CPU; the workers build their own
        teacher = create_teacher(cfg.teacher, RuntimeConfig(device="cpu"))
    with Leases(store) as leases:
        root, manifest, cfg = _open_root(store, teacher, cfg, urls, leases)
        todo = [u for u in urls if not is_complete(root, shard_name(u))]
        log.info("%s: %d of %d shards to extract%s", public_url(store), len(todo), len(urls),
                 f" ({len(urls) - len(todo)} complete already)" if len(todo) < len(urls) else "")
        try:
            local_gpu = (device.index,) if device is not None and device.type == "cuda" else ()
            gpus = tuple(torch.device(d).index for d in devices) or local_gpu
            with ExtractProgress(len(urls), len(urls) - len(todo), enabled=progress, gpus=gpus) as bar:
                _extract_todo(todo, store, root, cfg, devices, leases, bar)
        except BaseException:  # shards that completed stay listed even when another one failed ...
            with suppress(GenddError):  # ... where the disk still takes the manifest; a re-run lists them anyway
                _finalize(store, root, manifest, urls)
            raise
        return _finalize(store, root, manifest, urls)


def _open_root(store: str, teacher: Teacher, cfg: ExtractConfig, urls: list[str], leases: Leases):
    """The store's root, its manifest and ``cfg`` with the logits mode made concrete. The writer holding the
    root's lease writes the manifest and head of a new store; another one started at the same moment waits for
    that manifest, then, like any later run, must match it."""
    while True:
        with _writing(store, "the store"):
            root = open_root(store)
        if MANIFEST_ATTR in root.attrs:
            break
        with _writing(store, "the lease of the store's root"):
            taken = leases.take("root")
        if not taken:
            time.sleep(POLL_S)  # another writer is creating the store
            continue
        try:
            with _writing(store, "the store"):
                root = open_root(store)
            if MANIFEST_ATTR not in root.attrs:
                cfg = replace(cfg, logits=_logits_mode(cfg.logits, teacher, None))
                manifest = requested_manifest(teacher, cfg)
                with _writing(store, "the manifest and teacher head"):
                    write_root(root, manifest, teacher.head())
                return root, manifest, cfg
        finally:
            with _writing(store, "the lease of the store's root"):
                leases.release("root")
    existing = dict(root.attrs[MANIFEST_ATTR])
    cfg = replace(cfg, logits=_logits_mode(cfg.logits, teacher, existing))
    check_compatible(store, existing, requested_manifest(teacher, cfg))
    _check_sources(store, root, urls)
    return root, existing, cfg


def _extract_todo(todo: list[str], store: str, root, cfg: ExtractConfig, devices: tuple[str, ...], leases: Leases,
                  bar) -> None:
    """Extract every shard of ``todo`` that no other live writer holds, then wait for the ones others hold
    (taking over any whose writer let its lease expire) until every shard of ``todo`` is complete."""
    counted: set[str] = set()

    def claim(name: str) -> bool:  # this writer's now, and not completed meanwhile by another one
        with _writing(store, f"the lease of feature shard {name}"):
            if not leases.take(name):
                return False
        if is_complete(root, name):
            done(name)
            return False
        return True

    def done(name: str) -> None:
        with _writing(store, f"the lease of feature shard {name}"):
            leases.release(name)
        if name not in counted:
            counted.add(name)
            bar.shard_done()

    if not todo:
        return
    in_process, waited, progressed = cfg.dask_workers == 0 and not cfg.scheduler, False, time.monotonic()
    with nullcontext() if in_process else dask_client(cfg.scheduler, cfg.dask_workers, cfg.threads, devices) as client:
        while True:
            if in_process:
                for url in todo:
                    if claim(shard_name(url)):
                        extract_shard(url, store, cfg, report=bar.add_images, source=recorded_source(url))
                        done(shard_name(url))
            else:
                run_per_shard(extract_shard, {shard_name(u): u for u in todo}, (store, cfg), client, bar, devices,
                              claim, done, extra={shard_name(u): {"source": recorded_source(u)} for u in todo})
            complete = {name for name in map(shard_name, todo) if is_complete(root, name)}
            for name in complete - counted:  # completed by another writer
                done(name)
            progressed = time.monotonic() if len(complete) else progressed
            todo = [u for u in todo if shard_name(u) not in complete]
            if not todo:
                return
            holder = leases.holder(shard_name(todo[0])) or {}
            if time.monotonic() - progressed > cfg.lease_wait:
                raise GenddError(f"{public_url(store)}: shard {shard_name(todo[0])} is held by another extraction "
                                 f"({holder.get('host', '?')}, pid {holder.get('pid', '?')}) that is alive but "
                                 f"completed none of the {len(todo)} shards it holds in {cfg.lease_wait:g} s; stop "
                                 "it or re-run when it has finished (complete shards are kept)")
            if not waited:
                log.info("%s: %d shards are being written by another extraction (%s, pid %s); waiting for them, "
                         "or for its leases to expire if it died", public_url(store), len(todo),
                         holder.get("host", "?"), holder.get("pid", "?"))
                waited = True
            time.sleep(POLL_S)


def _logits_mode(mode: str, teacher: Teacher, existing: dict | None) -> str:
    """``auto`` made concrete (an existing store's own mode, else derived where the classifier is one linear
    layer, else full); ``derived`` refused for a teacher whose logits are not ``f @ W.T + b``."""
    if mode == "auto" and existing and "logits" in existing:
        return logits_spec(existing["logits"])
    if mode == "auto":
        return "derived" if teacher.linear_head else "full"
    if mode == "derived" and not teacher.linear_head:
        kind = type(teacher.model.get_classifier()).__name__
        raise GenddError(f"--logits derived: the classifier of {teacher.config.name} is a {kind}, not one linear layer "
                         "on the pre-logits features, so its logits cannot be derived; use --logits full")
    return mode


@contextmanager
def _writing(store: str, what: str):
    """A filesystem refusing a write (full, read-only, gone) as one line naming the store and what was written."""
    try:
        yield
    except GenddError:
        raise
    except Exception as exc:
        explained = explain(exc, store, f"write {what}")
        if explained is not None:
            raise explained from exc
        if not isinstance(exc, OSError):
            raise
        raise GenddError(f"{public_url(store)}: cannot write {what} ({exc.strerror or exc}); complete shards are kept, "
                         "re-run to resume") from exc


def _check_sources(store: str, root, urls: list[str]) -> None:
    """A complete feature shard must come from the input shard now given: the one it records, or one given from
    elsewhere (a copy, a bucket) with the same bytes."""
    for url in urls:
        name = shard_name(url)
        if not is_complete(root, name):
            continue
        attrs = root[f"{SHARDS}/{name}"].attrs
        if attrs["source"] in (recorded_source(url), public_url(url)):  # (earlier stores: absolute paths)
            continue
        with storage_errors(url, "read the shard"):
            sha = file_sha256(url)
        if sha != attrs["source_sha256"]:
            raise GenddError(f"{public_url(store)}: shard {name} was extracted from {attrs['source']} "
                             f"(sha256 {attrs['source_sha256'][:12]}), not from {public_url(url)} (sha256 {sha[:12]}); "
                             "use a new --out")


def _finalize(store: str, root, manifest: dict, urls: list[str]) -> dict:
    """Record every complete shard (earlier ones first, then this run's in input order) in the manifest."""
    order = [s["name"] for s in manifest["shards"]] + [shard_name(u) for u in urls]
    shards, skipped, seen = [], [], set()
    for name in order:
        if name in seen or not is_complete(root, name):
            continue
        seen.add(name)
        attrs = root[f"{SHARDS}/{name}"].attrs
        shards.append({"name": name, "source": attrs["source"], "count": attrs["count"],
                       "source_sha256": attrs["source_sha256"],
                       **({"int8_cosine": attrs["int8_cosine"]} if "int8_cosine" in attrs else {})})
        skipped += [{"shard": name, **s} for s in attrs["skipped"]]
    manifest = {**manifest, "shards": shards, "skipped": skipped}
    measured = [s for s in shards if "int8_cosine" in s]
    if measured:  # the int8 codec's measured round trip over the whole store, the mean weighted by samples
        samples = sum(s["count"] for s in measured) or 1
        manifest["int8_cosine"] = {"min": min(s["int8_cosine"]["min"] for s in measured),
                                   "mean": sum(s["int8_cosine"]["mean"] * s["count"] for s in measured) / samples}
    with _writing(store, "the manifest"):
        root.attrs[MANIFEST_ATTR] = manifest
    return manifest


@configclass(kw_only=True)
class ExtractStage(ExtractConfig):
    """Stage ``extract``: the extraction and where it reads and writes."""

    shards: Shards  # input shards: paths, brace patterns or fsspec URLs
    out: OutputDir  # the feature store (path or URL), created or resumed
    metrics: OutputFile | None = None  # a JSON summary for dvc metrics: samples, images/s, bytes per view, compression


def run_stage(cfg: ExtractStage, progress: bool = True) -> dict:
    """Extract (or resume) the store, write the config at its root and the summary to ``cfg.metrics``."""
    from gendd_pipe.store.audit import summarize

    start = time.perf_counter()
    manifest = extract(list(cfg.shards), cfg.out, narrow(cfg, ExtractConfig), progress)
    seconds = time.perf_counter() - start
    write_yaml(config_beside(cfg.out), to_dict(cfg))
    summary = summarize(FeatureStore.open(cfg.out))
    metrics = {"shards": summary["shards"], "samples": summary["samples"], "images_per_s": summary["samples"] / seconds,
               "bytes_per_view": summary["bytes_per_view"], "compression_ratio": summary["compression_ratio"],
               "skipped": len(manifest["skipped"])}
    log.info("%s: %d shards, %d samples, %d skipped, %.2fx smaller than fp32", cfg.out, summary["shards"],
             summary["samples"], metrics["skipped"], metrics["compression_ratio"])
    if cfg.metrics:
        write_json(cfg.metrics, metrics)  # the settings are in the store's manifest
    return metrics
