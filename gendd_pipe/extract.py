"""Extraction: run a teacher once over image shards and write a feature store.

The driver (`extract`) writes the manifest and the teacher head first, then
extracts every input shard whose feature shard is not complete: one task per
shard (`gendd_pipe.shard_task.extract_shard`), run as a Dask task
(`gendd_pipe.cluster`) or here, each shard claimed through its lease
(`gendd_pipe.store.lease.Claims`) so that two extractions on one store share the
work, and a task's failure comes back as its result, raised here as one line.
Last, the shard list and skipped samples go into the manifest. Everything
written derives from the inputs and the config, so a resumed run writes the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext, suppress
from dataclasses import field, replace
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator

from gendd_pipe import __version__
from gendd_pipe.cluster import (TaskFailure, dask_client, local_devices, run_in_process, run_per_shard,
                                split_threads)
from gendd_pipe.config import (NonNegativeInt, OutputDir, OutputFile, PositiveInt, Shards, configclass, narrow,
                               to_dict)
from gendd_pipe.data.augment import AugmentConfig
from gendd_pipe.data.shards import expand_urls, shard_name
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.errors import GenddError
from gendd_pipe.files import file_sha256, public_url, write_json, write_yaml
from gendd_pipe.layout import config_beside
from gendd_pipe.models.teacher import Teacher, TeacherConfig, cached_teacher, create_teacher
from gendd_pipe.runtime import RuntimeConfig, resolve_device
from gendd_pipe.shard_task import ShardConfig, extract_shard, view_manifest
from gendd_pipe.storage import storage_errors
from gendd_pipe.store.format import (MANIFEST_ATTR, SHARDS, check_compatible, is_int8, logits_spec, parse_logits,
                                     recorded_source, shard_views)
from gendd_pipe.store.lease import Claims, Leases
from gendd_pipe.store.reader import FeatureStore
from gendd_pipe.store.writer import RESUME, is_complete, open_root, write_root

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


def requested_manifest(teacher: Teacher, cfg: ExtractConfig) -> dict:
    """Everything that fixes the bytes of a store, plus an empty shard list. Augmented stores are format
    version 3, or 4 with color jitter (readers that do not replay them refuse them); plain ones stay version 2."""
    return {
        **view_manifest(teacher, cfg.views, cfg.augment),
        "logits": parse_logits(cfg.logits),
        "compute": {"precision": cfg.runtime.precision},
        "storage": {"features_dtype": cfg.features_dtype, "codec": "blosc-zstd-bitshuffle", "clevel": cfg.clevel,
                    "chunk_size": cfg.chunk_size, **({"int8_floor": cfg.int8_floor} if cfg.features_dtype == "int8" else {})},
        "shards": [],
        "skipped": [],
        "tool_version": __version__,
    }


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
        todo = [u for u in urls if not is_complete(root, shard_name(u), cfg.views.count)]
        log.info("%s: %d of %d shards to extract%s", public_url(store), len(todo), len(urls),
                 f" ({len(urls) - len(todo)} complete already)" if len(todo) < len(urls) else "")
        try:
            local_gpu = (device.index,) if device is not None and device.type == "cuda" else ()
            gpus = tuple(torch.device(d).index for d in devices) or local_gpu
            with ExtractProgress(len(urls), len(urls) - len(todo), enabled=progress, gpus=gpus) as bar:
                _extract_todo(todo, store, root, manifest, cfg, devices, leases, bar)
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
        with storage_errors(store, "write the store", hint=RESUME):
            root = open_root(store)
        if MANIFEST_ATTR in root.attrs:
            break
        with storage_errors(store, "write the lease of the store's root", hint=RESUME):
            taken = leases.take("root")
        if not taken:
            time.sleep(POLL_S)  # another writer is creating the store
            continue
        try:
            with storage_errors(store, "write the store", hint=RESUME):
                root = open_root(store)
            if MANIFEST_ATTR not in root.attrs:
                cfg = replace(cfg, logits=_logits_mode(cfg.logits, teacher, None))
                manifest = requested_manifest(teacher, cfg)
                with storage_errors(store, "write the manifest and teacher head", hint=RESUME):
                    write_root(root, manifest, teacher.head())
                return root, manifest, cfg
        finally:
            with storage_errors(store, "write the lease of the store's root", hint=RESUME):
                leases.release("root")
    existing = dict(root.attrs[MANIFEST_ATTR])
    cfg = replace(cfg, logits=_logits_mode(cfg.logits, teacher, existing))
    check_compatible(store, existing, requested_manifest(teacher, cfg))
    _check_sources(store, root, urls)
    count, stored = cfg.views.count, existing["views"]["count"]
    if count < stored:
        raise GenddError(f"{public_url(store)}: --views {count} is below its {stored} views per image; a store does "
                         f"not shrink: train on its first {count} with distill --views {count} (loader.views), or "
                         "extract into a new --out")
    if count > stored and is_int8(existing):
        raise GenddError(f"{public_url(store)}: --views {count}: its int8 features share one scale per chunk over "
                         "every view, so new views would change the stored ones; extract into a new --out")
    if count > stored:
        log.info("%s: growing from %d to %d views per image", public_url(store), stored, count)
    return root, {**existing, "views": {**existing["views"], "count": count}}, cfg


def _extract_todo(urls: list[str], store: str, root, manifest: dict, cfg: ExtractConfig, devices: tuple[str, ...],
                  leases: Leases, bar) -> None:
    """Extract every shard of ``urls`` that no other live writer holds, then wait for the ones others hold
    (taking over any whose writer let its lease expire) until every one is complete."""
    if not urls:
        return
    by_name = {shard_name(u): u for u in urls}
    claims = Claims(store, root, leases, list(by_name), cfg.views.count)
    in_process, waited, progressed = cfg.dask_workers == 0 and not cfg.scheduler, False, time.monotonic()
    task = narrow(cfg, ShardConfig)
    report = {"report": bar.add_images} if in_process else {}  # Dask tasks report through the worker's events
    extra = {name: {"source": recorded_source(u), **report} for name, u in by_name.items()}
    with nullcontext() if in_process else dask_client(cfg.scheduler, cfg.dask_workers, cfg.threads, devices) as client:
        while claims.todo:
            shards = ((name, by_name[name]) for name in claims.claimed())
            if in_process:
                results = run_in_process(extract_shard, shards, (store, manifest, task), extra)
            else:
                results = run_per_shard(extract_shard, shards, (store, manifest, task), client, bar, devices, extra)
            for name, result in results:
                if isinstance(result, TaskFailure):
                    raise GenddError(result.message)
                claims.finish(name)
                bar.shard_done()
            completed = claims.settle()
            for _ in set(completed) - claims.written:  # completed by another writer
                bar.shard_done()
            progressed = time.monotonic() if completed else progressed
            if not claims.todo:
                return
            holder, first = claims.holder(), claims.todo[0]
            if time.monotonic() - progressed > cfg.lease_wait:
                raise GenddError(f"{public_url(store)}: shard {first} is held by another extraction "
                                 f"({holder.get('host', '?')}, pid {holder.get('pid', '?')}) that is alive but "
                                 f"completed none of the {len(claims.todo)} shards it holds in {cfg.lease_wait:g} s; "
                                 "stop it or re-run when it has finished (complete shards are kept)")
            if not waited:
                log.info("%s: %d shards are being written by another extraction (%s, pid %s); waiting for them, "
                         "or for its leases to expire if it died", public_url(store), len(claims.todo),
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
    held = [shard_views(root[f"{SHARDS}/{s['name']}"]) for s in shards]
    count = min(held, default=manifest["views"]["count"])  # the views every shard holds: all it reads as
    manifest = {**manifest, "views": {**manifest["views"], "count": count}, "shards": shards, "skipped": skipped}
    measured = [s for s in shards if "int8_cosine" in s]
    if measured:  # the int8 codec's measured round trip over the whole store, the mean weighted by samples
        samples = sum(s["count"] for s in measured) or 1
        manifest["int8_cosine"] = {"min": min(s["int8_cosine"]["min"] for s in measured),
                                   "mean": sum(s["int8_cosine"]["mean"] * s["count"] for s in measured) / samples}
    with storage_errors(store, "write the manifest", hint=RESUME):
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
