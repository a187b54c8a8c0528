"""Looking into a store: `summarize` (what `gendd-pipe info` prints) and `check_store`.

`check_store` finds what is wrong with a store's bytes alone: a listed shard
missing or incomplete, an array missing, unreadable or not matching the checksum
written with it, array lengths and widths, duplicate keys, values not finite.
Recomputing features through the teacher needs the data and the models, so it
lives above the store (`gendd_pipe.verify`).
"""

from __future__ import annotations

import numpy as np

from gendd_pipe.store.format import COMPUTE_BEFORE_PRECISION, shard_schema
from gendd_pipe.store.reader import FeatureStore


def summarize(store: FeatureStore) -> dict:
    """Manifest summary plus sizes: bytes on disk and compression against raw fp32."""
    manifest = store.manifest
    schema = shard_schema(manifest)
    stored = raw = payload_stored = samples = 0
    for name in store.shard_names:
        group = store.shard(name)
        samples += int(group.attrs["count"])
        for key, array in group.arrays():
            size = array.nbytes_stored()
            stored += size
            spec = schema.get(key)
            if spec is not None and spec.payload:
                raw += array.size * 4
            if spec is not None and (spec.payload or spec.per_chunk):  # per chunk: the int8 features' scales
                payload_stored += size
    views = samples * manifest["views"]["count"]
    return {
        "store": store.url,
        "teacher": manifest["teacher"],
        "preprocessing": manifest["preprocessing"],
        "views": manifest["views"],
        "logits": manifest["logits"],
        "compute": manifest.get("compute", COMPUTE_BEFORE_PRECISION),
        "storage": {"features_dtype": "float16", **manifest.get("storage", {})},
        **({"int8_cosine": manifest["int8_cosine"]} if "int8_cosine" in manifest else {}),
        "shards": len(store.shard_names),
        "samples": samples,
        "skipped": len(manifest["skipped"]),
        "bytes_stored": stored,
        "bytes_per_view": stored / views if views else 0.0,
        "raw_fp32_bytes": raw,
        "compression_ratio": raw / payload_stored if payload_stored else 0.0,
        "tool_version": manifest["tool_version"],
    }


def check_shard(store: FeatureStore, name: str) -> list[str]:
    """Problems found in one shard (empty if consistent)."""
    data, problems = store.check_arrays(name)  # missing, unreadable, short, or not matching its checksum
    for key, spec in shard_schema(store.manifest).items():
        if key in data and data[key].shape[1:] != spec.shape:
            expected = ", ".join(["n", *map(str, spec.shape)])
            problems.append(f"shard {name}: {key} has shape {data[key].shape}, expected ({expected})")
        if key in data and spec.payload and not np.isfinite(data[key].astype(np.float32)).all():
            problems.append(f"shard {name}: {key} holds NaN or inf")
    if "keys" in data and len(set(data["keys"].tolist())) != len(data["keys"]):
        problems.append(f"shard {name}: duplicate keys")
    return problems


def check_store(store: FeatureStore) -> list[str]:
    """Problems found in the whole store: listed shards missing or incomplete, then each shard's own."""
    listed = [s["name"] for s in store.manifest["shards"]]
    problems = [f"shard {n}: listed in the manifest but missing or incomplete"
                for n in listed if n not in store.shard_names]
    for name in store.shard_names:
        problems += check_shard(store, name)
    return problems
