"""Feature store format versions 2 to 4: names, codecs, the manifest and what makes two stores compatible.

Version 3 is a version-2 store with an ``augment`` section: RandAugment draws and mixes stored per view
(`gendd_pipe.data.augment`), which readers that do not replay them must refuse. Version 4 is a version-3
store whose views are color-jittered too (``jitter``), which a version-3 reader would not replay. Plain stores
stay version 2, and augmented ones without color jitter version 3.

Version 2 adds logits mode ``derived`` (no logits array: readers compute ``f @ W.T + b`` from the stored
head), the manifest's ``compute`` section (the precision the teacher ran in), ``views.renderer`` (how
pixels were cut from the views) and the lossy ``int8`` feature codec. Every version-1 store is a valid
version-2 store of mode ``full`` or ``topk``, computed in fp32, rendered by ``pil``, with float16 features,
and opens and distills as before.

The int8 codec keeps ``features`` as int8 with one scale per channel for every block of ``chunk_size``
rows (``feature_scales``, (ceil(n / chunk_size), D) float32): a feature is ``q * scale`` with
``scale = max |f| / 127`` over its block and channel. Extraction measures the round-trip cosine of every
view, refuses a shard whose lowest one is under ``storage.int8_floor`` and records the lowest in the shard's
attributes (``int8_cosine``) and in the manifest.

Layout (a Zarr v3 group; see docs/store.md). A shard's arrays are declared once, by `shard_schema`, which the
writer, the reader, ``info``/``verify`` and extraction all read::

    store.zarr/                 attrs["gendd_pipe"] = manifest
      teacher/head_weight (C, D) float32, teacher/head_bias (C,) float32
      shards/<name>/            attrs: source, source_sha256, count, skipped, checksums, complete (and views,
                                where the shard was grown: the views its rows hold)
        keys (n,) str, labels (n,) int64, views (n, V, 5) float32,
        jitter (n, V, 6) float32 (version 4), augment (n, V, L, 3) float32 and/or mix (n, V, 7) float32
        (version 3: `gendd_pipe.data.augment`),
        features (n, V, D) float16, or int8 + feature_scales (ceil(n / chunk), D) float32 (codec int8)
        logits (n, V, C) float16 (mode full)
        or topk_values (n, V, k) float16 + topk_indices (n, V, k) int32 (mode topk)
        or nothing more (mode derived)
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec

from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url

FORMAT_VERSION = 2
AUGMENTED_VERSION = 3  # a store with an ``augment`` section: RandAugment draws and mixes stored per view
JITTERED_VERSION = 4  # ... with color jitter too, which a version-3 reader would not replay
WRITTEN_VERSIONS = (FORMAT_VERSION, AUGMENTED_VERSION, JITTERED_VERSION)  # what this code extends
READABLE_VERSIONS = (1, 2, 3, 4)  # what this code opens and distills
MANIFEST_ATTR = "gendd_pipe"
SHARDS = "shards"
HEAD_WEIGHT, HEAD_BIAS = "teacher/head_weight", "teacher/head_bias"
COMPLETE, CHECKSUMS, VIEWS_ATTR = "complete", "checksums", "views"
VIEW_ARRAYS = ("views", "jitter", "augment", "mix")  # a row's arrays that make the pixels of its views
# The columns of the per-view arrays (`gendd_pipe.data.views`, `gendd_pipe.data.augment` draw and replay them).
VIEW_FIELDS = ("top", "left", "height", "width", "hflip")
JITTER_FIELDS = ("first", "second", "third", "brightness", "contrast", "saturation")  # the order (0 brightness,
# 1 contrast, 2 saturation), then the three factors
MIX_FIELDS = ("partner", "kind", "lam", "top", "left", "bottom", "right")
RANDAUGMENT_FIELDS = ("op", "magnitude", "probability")  # one row per RandAugment layer

# Fields that must agree before a store is extended or resumed: anything that changes the bytes.
# (The format version follows from the augment section: 4 with color jitter, 3 with another, 2 without.)
COMPATIBLE_SECTIONS = ("teacher", "preprocessing", "views", "augment", "logits", "compute", "storage")
COMPUTE_BEFORE_PRECISION = {"precision": "fp32"}  # what stores written before the compute section ran in
RENDERER_BEFORE = "pil"  # how stores written before views.renderer made their pixels
INT8_LEVELS = 127


def compressor(clevel: int = 5) -> BloscCodec:
    """Blosc zstd with bit shuffle: fp16 features compress well once their bits are grouped."""
    return BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle")


@dataclass(frozen=True)
class ArraySpec:
    """One array of a feature shard: what one row of it holds.

    Attributes:
        name: The array's name in the shard's group.
        shape: One row's shape (the row axis first is left out).
        dtype: A numpy dtype name, or ``str`` for variable-length UTF-8.
        payload: Teacher output: counted against raw fp32 by ``info``, checked finite by ``verify``.
        per_chunk: One row per chunk of samples (the int8 codec's scales), not one per sample.
        per_view: One entry per view in each row (its first axis after the rows): what growing a store by
            views extends (`gendd_pipe.shard_task`).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    payload: bool = False
    per_chunk: bool = False
    per_view: bool = False

    def rows(self, samples: int, chunk_size: int) -> int:
        """The rows this array has in a shard of ``samples`` samples."""
        return math.ceil(samples / chunk_size) if self.per_chunk else samples


def shard_schema(manifest: dict) -> dict[str, ArraySpec]:
    """Every array a feature shard of this store holds, by name, in the order they are written: the one
    description of a shard that writing, reading, checking and extracting follow."""
    v, teacher, logits = manifest["views"]["count"], manifest["teacher"], manifest["logits"]
    view = dict(per_view=True)
    specs = [ArraySpec("keys", (), "str"), ArraySpec("labels", (), "int64"),
             ArraySpec("views", (v, len(VIEW_FIELDS)), "float32", **view)]
    augmented = augment_arrays(manifest)
    if "jitter" in augmented:
        specs.append(ArraySpec("jitter", (v, len(JITTER_FIELDS)), "float32", **view))
    if "augment" in augmented:
        specs.append(ArraySpec("augment", (v, manifest["augment"]["layers"], len(RANDAUGMENT_FIELDS)), "float32",
                               **view))
    if "mix" in augmented:
        specs.append(ArraySpec("mix", (v, len(MIX_FIELDS)), "float32", **view))
    width = teacher["num_features"]
    specs.append(ArraySpec("features", (v, width), "int8" if is_int8(manifest) else "float16", payload=True,
                           **view))
    if logits["mode"] == "full":
        specs.append(ArraySpec("logits", (v, teacher["num_classes"]), "float16", payload=True, **view))
    elif logits["mode"] == "topk":
        specs += [ArraySpec("topk_values", (v, logits["k"]), "float16", payload=True, **view),
                  ArraySpec("topk_indices", (v, logits["k"]), "int32", **view)]
    if is_int8(manifest):  # the int8 codec's scales, one row per chunk of features
        specs.append(ArraySpec("feature_scales", (width,), "float32", per_chunk=True))
    return {spec.name: spec for spec in specs}


def is_mixed_store(manifest: dict) -> bool:
    """Whether a store's views are mixed (their labels soft: the sample's and its partner's)."""
    return "mix" in augment_arrays(manifest)


def augment_arrays(manifest: dict) -> list[str]:
    """The arrays of an augmented store's shards beside ``views``: ``jitter`` (n, V, 6) where color jitter is
    drawn, ``augment`` (n, V, L, 3) where RandAugment is, ``mix`` (n, V, 7) where views are mixed."""
    section = manifest.get("augment") or {}
    mixing = (section.get("mixup", 0) > 0 or section.get("cutmix", 0) > 0) and section.get("mix_prob", 0) > 0
    return ((["jitter"] if section.get("color_jitter", 0) > 0 else []) +
            (["augment"] if section.get("randaugment") else []) + (["mix"] if mixing else []))


def format_version(augment: dict) -> int:
    """The version a store of this ``augment`` section (empty: none) is written as."""
    if not augment:
        return FORMAT_VERSION
    return JITTERED_VERSION if augment.get("color_jitter", 0) > 0 else AUGMENTED_VERSION


def is_int8(manifest: dict) -> bool:
    return manifest.get("storage", {}).get("features_dtype") == "int8"


def renderer_of(manifest: dict) -> str:
    """The renderer a store's views were extracted with."""
    return manifest["views"].get("renderer", RENDERER_BEFORE)


class Checksum:
    """``sha256:HEX`` of an array's values (C order; strings joined by NUL), fed block by block along the
    first axis, whatever the chunks and codecs."""

    def __init__(self):
        self._sha, self._strings = hashlib.sha256(), False

    def update(self, block: np.ndarray) -> None:
        if block.dtype.kind in "OUT":
            if len(block):
                text = "\x00".join(map(str, block.tolist()))
                self._sha.update((("\x00" if self._strings else "") + text).encode())
                self._strings = True
        else:
            self._sha.update(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).data)

    def hexdigest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


def checksum(data: np.ndarray) -> str:
    """The `Checksum` of a whole array."""
    digest = Checksum()
    digest.update(data)
    return digest.hexdigest()


def quantize_int8(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of features (n, V, D) -> int8 (n, V, D), the per-channel scales (D,) float32, and the
    round-trip cosine of every view (n, V)."""
    x = features.astype(np.float32)
    scales = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0) / INT8_LEVELS if x.size else np.zeros(x.shape[-1])
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scales), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    back = q.astype(np.float32) * scales
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(back, axis=-1)
    cosine = np.where(norms > 0, (x * back).sum(-1) / np.maximum(norms, 1e-30), 1.0)
    return q, scales, cosine


def dequantize_int8(q: np.ndarray, scales: np.ndarray, rows_per_scale: int, start: int = 0) -> np.ndarray:
    """int8 features (n, ...) from row ``start`` on, with their blocks' scales (blocks, D) -> float32."""
    block = (start + np.arange(len(q))) // rows_per_scale
    return q.astype(np.float32) * scales[block].reshape((len(q),) + (1,) * (q.ndim - 2) + scales.shape[-1:])


def parse_logits(mode: str) -> dict:
    """``full``, ``derived`` or ``topk:K`` -> the manifest's ``logits`` section."""
    if mode in ("full", "derived"):
        return {"mode": mode}
    match = re.fullmatch(r"topk:(\d+)", mode)
    if not match or int(match.group(1)) < 1:
        raise GenddError(f"logits mode must be full, derived or topk:K with K >= 1, not {mode!r}")
    return {"mode": "topk", "k": int(match.group(1))}


def logits_spec(section: dict) -> str:
    """The manifest's ``logits`` section as the option that writes it: ``full``, ``derived`` or ``topk:K``."""
    return section["mode"] + (f":{section['k']}" if "k" in section else "")


def shard_views(group, default: int | None = None) -> int:
    """The views every row of a complete feature shard holds, which its checksums cover: its ``views`` attribute
    (written with the shard, and by growing it: before its arrays grow, and again once the new views are
    written); for a shard written before there was one, ``default`` (a reader's manifest count: such a shard
    is read before any growth began) or its views array's width."""
    held = group.attrs.get(VIEWS_ATTR) or default
    return int(held if held is not None else group["views"].shape[1])


def check_compatible(store: str, existing: dict, requested: dict) -> None:
    """Refuse to extend a store whose bytes would come from another teacher, recipe or precision. The view count
    may differ: a request of more views grows the store (`gendd_pipe.extract`), of fewer is refused there."""
    existing = {"compute": COMPUTE_BEFORE_PRECISION, **existing}
    existing["views"] = {"renderer": RENDERER_BEFORE, **existing.get("views", {}),
                         "count": requested["views"]["count"]}
    if existing.get("format_version") not in WRITTEN_VERSIONS:
        raise GenddError(f"{store}: format version {existing.get('format_version')} cannot be extended by this "
                         f"version, which writes versions {', '.join(map(str, WRITTEN_VERSIONS))} (it still reads "
                         "it); use a new --out")
    for section in COMPATIBLE_SECTIONS:
        old, new = existing.get(section), requested.get(section)
        if old != new:
            fields = sorted(k for k in (old or {}) | (new or {}) if (old or {}).get(k) != (new or {}).get(k))
            raise GenddError(
                f"{store}: written with another {section} ({', '.join(fields)} differ: "
                f"{_short(old, fields)} vs requested {_short(new, fields)}); refusing to mix, use a new --out"
            )


def recorded_source(url: str) -> str:
    """How a feature shard records its input shard: a URL as given, without credentials; a local path inside the
    current directory (the project: DVC runs every stage from its root) relative to it, so two checkouts that
    build the same store write the same bytes and a clone finds the shards where its own checkout has them;
    any other path absolute."""
    if "://" in url:
        return public_url(url)
    path = os.path.abspath(url)
    relative = os.path.relpath(path)
    outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
    return path if outside else relative.replace(os.sep, "/")


def derive_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Logits of mode ``derived``: the stored features (any leading shape, D last) through the stored head, float32."""
    return features.astype(np.float32) @ weight.T + bias


def _short(section: dict | None, fields: list[str]) -> str:
    return str({k: (section or {}).get(k) for k in fields[:3]})
