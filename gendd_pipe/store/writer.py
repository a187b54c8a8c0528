"""Writing feature stores: the root (manifest, teacher head) and one feature shard at a time.

A feature shard is written by a single task into its own subgroup, so writers
never share a chunk. Each array's checksum goes into the shard's attributes
(`FeatureStore.read_shard` checks them). Its ``complete`` attribute is written last: object stores
have no rename, so that attribute is the commit, and readers ignore a shard
without it. A partial shard is simply rewritten on resume.
"""

from __future__ import annotations

import numpy as np
import zarr

from gendd_pipe.store.format import (CHECKSUMS, COMPLETE, HEAD_BIAS, HEAD_WEIGHT, MANIFEST_ATTR, SHARDS, checksum,
                                     compressor)


def open_root(url: str, mode: str = "a", storage_options: dict | None = None) -> zarr.Group:
    return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)


def write_root(root: zarr.Group, manifest: dict, head: tuple[np.ndarray, np.ndarray]) -> None:
    """Write the manifest and the teacher's classifier (the class centers of Distribution Contraction)."""
    weight, bias = head
    for name, data in ((HEAD_WEIGHT, weight), (HEAD_BIAS, bias)):
        root.create_array(name, data=data.astype(np.float32), compressors=compressor(), overwrite=True)
    root.require_group(SHARDS)
    root.attrs[MANIFEST_ATTR] = manifest


def is_complete(root: zarr.Group, name: str) -> bool:
    group = root.get(f"{SHARDS}/{name}")
    return group is not None and bool(group.attrs.get(COMPLETE, False))


def write_shard(root: zarr.Group, name: str, arrays: dict[str, np.ndarray], attrs: dict, chunk: int, clevel: int) -> None:
    """Write one feature shard's arrays, chunked along samples, then its attrs, then ``complete``.

    Args:
        root: The store's root group.
        name: Feature-shard name (the input shard's file name without ``.tar``).
        arrays: ``keys``, ``labels``, ``views``, ``features`` and the logits arrays, all of length n.
        attrs: Shard attributes (source, source_sha256, count, skipped).
        chunk: Samples per chunk.
        clevel: Blosc compression level.
    """
    group = root.create_group(f"{SHARDS}/{name}", overwrite=True)
    for key, data in arrays.items():
        chunks = (max(1, min(chunk, len(data))),) + data.shape[1:]
        if data.dtype.kind in "OUT":  # variable-length UTF-8, readable by any Zarr v3 implementation
            array = group.create_array(key, shape=data.shape, dtype=str, chunks=chunks)
        else:
            array = group.create_array(key, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                       compressors=compressor(clevel))
        if data.size:
            array[...] = data
    group.attrs.update({**attrs, CHECKSUMS: {key: checksum(data) for key, data in arrays.items()}})
    group.attrs[COMPLETE] = True
