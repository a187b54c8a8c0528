"""Feature store format version 2: names, codecs, the manifest and what makes two stores compatible.

Version 2 adds logits mode ``derived`` (no logits array: readers compute ``f @ W.T + b`` from the stored
head) and the manifest's ``compute`` section (the precision the teacher ran in). Every version-1 store is a
valid version-2 store of mode ``full`` or ``topk`` computed in fp32, and opens and distills as before.

Layout (a Zarr v3 group; see README "The feature store")::

    store.zarr/                 attrs["gendd_pipe"] = manifest
      teacher/head_weight (C, D) float32, teacher/head_bias (C,) float32
      shards/<name>/            attrs: source, source_sha256, count, skipped, checksums, complete
        keys (n,) str, labels (n,) int64, views (n, V, 5) float32,
        features (n, V, D) float16, logits (n, V, C) float16 (mode full)
        or topk_values (n, V, k) float16 + topk_indices (n, V, k) int32 (mode topk)
        or nothing more (mode derived)
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from zarr.codecs import BloscCodec

from gendd_pipe.errors import GenddError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # what this code opens and distills; it extends stores of FORMAT_VERSION only
MANIFEST_ATTR = "gendd_pipe"
SHARDS = "shards"
HEAD_WEIGHT, HEAD_BIAS = "teacher/head_weight", "teacher/head_bias"
COMPLETE, CHECKSUMS = "complete", "checksums"

# Fields that must agree before a store is extended or resumed: anything that changes the bytes.
COMPATIBLE_SECTIONS = ("format_version", "teacher", "preprocessing", "views", "logits", "compute", "storage")
COMPUTE_BEFORE_PRECISION = {"precision": "fp32"}  # what stores written before the compute section ran in


def compressor(clevel: int = 5) -> BloscCodec:
    """Blosc zstd with bit shuffle: fp16 features compress well once their bits are grouped."""
    return BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle")


def shard_arrays(manifest: dict) -> list[str]:
    """The arrays every feature shard of a store holds."""
    logits = {"full": ["logits"], "topk": ["topk_values", "topk_indices"], "derived": []}[manifest["logits"]["mode"]]
    return ["keys", "labels", "views", "features", *logits]


def checksum(data: np.ndarray) -> str:
    """``sha256:HEX`` of an array's values (C order; strings joined by NUL), whatever its chunks and codecs."""
    if data.dtype.kind in "OUT":
        payload = "\x00".join(str(x) for x in data.tolist()).encode()
    else:
        payload = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).data
    return "sha256:" + hashlib.sha256(payload).hexdigest()


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


def check_compatible(store: str, existing: dict, requested: dict) -> None:
    """Refuse to extend a store whose bytes would come from another teacher, recipe or precision."""
    existing = {"compute": COMPUTE_BEFORE_PRECISION, **existing}
    if existing.get("format_version") != FORMAT_VERSION:
        raise GenddError(f"{store}: format version {existing.get('format_version')} cannot be extended by this "
                         f"version, which writes version {FORMAT_VERSION} (it still reads it); use a new --out")
    for section in COMPATIBLE_SECTIONS:
        old, new = existing.get(section), requested.get(section)
        if old != new:
            fields = sorted(k for k in (old or {}) | (new or {}) if (old or {}).get(k) != (new or {}).get(k))
            raise GenddError(
                f"{store}: written with another {section} ({', '.join(fields)} differ: "
                f"{_short(old, fields)} vs requested {_short(new, fields)}); refusing to mix, use a new --out"
            )


def derive_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Logits of mode ``derived``: the stored features (any leading shape, D last) through the stored head, float32."""
    return features.astype(np.float32) @ weight.T + bias


def _short(section: dict | None, fields: list[str]) -> str:
    return str({k: (section or {}).get(k) for k in fields[:3]})
