"""Writing feature stores: the root (manifest, teacher head) and one feature shard at a time.

A feature shard is written by a single task into its own subgroup, so writers
never share a chunk; `ShardWriter` stores each chunk of rows as soon as it is
full, on a thread of its own, so compression and writes overlap the forward. Each array's checksum goes into the shard's attributes
(`FeatureStore.read_shard` checks them). Its ``complete`` attribute is written last: object stores
have no rename, so that attribute is the commit, and readers ignore a shard
without it. A partial shard is simply rewritten on resume.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zarr

from gendd_pipe.errors import GenddError
from gendd_pipe.store.format import (CHECKSUMS, COMPLETE, HEAD_BIAS, HEAD_WEIGHT, MANIFEST_ATTR, SHARDS, ArraySpec,
                                     Checksum, compressor, quantize_int8, shard_views)

RESUME = "complete shards are kept, re-run to resume"  # what a failed write leaves behind


def open_root(url: str, mode: str = "a", storage_options: dict | None = None) -> zarr.Group:
    return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)


def write_root(root: zarr.Group, manifest: dict, head: tuple[np.ndarray, np.ndarray]) -> None:
    """Write the manifest and the teacher's classifier (the class centers of Distribution Contraction)."""
    weight, bias = head
    for name, data in ((HEAD_WEIGHT, weight), (HEAD_BIAS, bias)):
        root.create_array(name, data=data.astype(np.float32), compressors=compressor(), overwrite=True)
    root.require_group(SHARDS)
    root.attrs[MANIFEST_ATTR] = manifest


def is_complete(root: zarr.Group, name: str, views: int | None = None) -> bool:
    """Whether feature shard ``name`` is committed (and, given ``views``, holds that many views per row)."""
    group = root.get(f"{SHARDS}/{name}")
    complete = group is not None and bool(group.attrs.get(COMPLETE, False))
    return complete and (views is None or shard_views(group) >= views)


class ShardWriter:
    """Write one feature shard block by block as its rows arrive: each full chunk of rows is compressed and
    stored on a thread of its own while the caller goes on; `commit` writes the rest, waits, then writes the
    checksums and attrs and last ``complete``. The bytes written do not depend on how the rows were handed over.

    The shard's group is opened as a hierarchy of its own, at its own path: zarr then writes nothing above it
    (creating arrays through the root would rewrite the root's and ``shards``' metadata each time, leaving
    zarr's temporary ``*.partial`` files there when a writer is killed), so all a writer killed mid-shard leaves
    is inside the incomplete shard, which the next writer replaces.

    Args:
        store: The store's path or URL (its root written by `write_root`).
        name: Feature-shard name.
        schema: The shard's arrays (`gendd_pipe.store.format.shard_schema`). Rows are handed over for every
            per-sample array, in any float or int dtype, and stored in the schema's; int8 ``features`` are
            handed over as floats and quantized per chunk (`quantize_int8`), their scales written beside them.
        chunk: Samples per chunk.
        clevel: Blosc compression level.
        int8_floor: For int8 features, the lowest round-trip cosine a chunk may have (refused under it).
    """

    def __init__(self, store: str, name: str, schema: dict[str, ArraySpec], chunk: int, clevel: int,
                 int8_floor: float = 0.0):
        self.name, self.chunk, self.clevel, self.int8_floor = name, chunk, clevel, int8_floor
        self.schema = schema
        self.int8 = "features" in schema and schema["features"].dtype == "int8"
        self.group = open_root(f"{store.rstrip('/')}/{SHARDS}/{name}", mode="w")
        self.arrays = {key: self._create(spec) for key, spec in schema.items()}
        self.sums = {key: Checksum() for key in schema}
        self.pending: dict[str, list[np.ndarray]] = {key: [] for key, spec in schema.items() if not spec.per_chunk}
        self.buffered, self.cosines = 0, []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"write-{name}")
        self._writes: list[Future] = []

    def _create(self, spec: ArraySpec) -> zarr.Array:
        if spec.dtype == "str":  # variable-length UTF-8, readable by any Zarr v3 implementation
            return self.group.create_array(spec.name, shape=(0,), dtype=str, chunks=(self.chunk,))
        rows = 1 if spec.per_chunk else self.chunk  # one row of scales per chunk of features
        return self.group.create_array(spec.name, shape=(0, *spec.shape), dtype=spec.dtype, chunks=(rows, *spec.shape),
                                       compressors=compressor(self.clevel))

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Rows of every array (all of one length); each whole chunk goes to the writing thread at once."""
        for key, data in rows.items():
            self.pending[key].append(data)
        self.buffered += len(next(iter(rows.values())))
        while self.buffered >= self.chunk:
            self._flush(self.chunk)

    def _flush(self, n: int) -> None:
        block = {}
        for key, parts in self.pending.items():
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            block[key] = data[:n]
            self.pending[key] = [data[n:]] if len(data) > n else []
        self.buffered -= n
        for key, data in block.items():
            if key != "features" or not self.int8:
                block[key] = data if self.schema[key].dtype == "str" else data.astype(self.schema[key].dtype, copy=False)
        if self.int8:
            block["features"], scales, cosine = quantize_int8(block["features"])
            block["feature_scales"] = scales[None]  # (1, D)
            self.cosines.append(cosine.ravel())
            if cosine.min() < self.int8_floor:
                raise GenddError(f"shard {self.name}: int8 features round-trip at cosine {cosine.min():.5f} at worst, "
                                 f"under the floor {self.int8_floor} (--int8-floor); keep --features-dtype float16 "
                                 "or lower the floor")
        for key, data in block.items():
            self.sums[key].update(data)
        while self._writes and self._writes[0].done():  # a failed earlier write (disk full, store gone) raises here
            self._writes.pop(0).result()
        self._writes.append(self._thread.submit(self._write, block))

    def _write(self, block: dict[str, np.ndarray]) -> None:
        for key, data in block.items():
            self.arrays[key].append(data)

    def commit(self, attrs: dict) -> dict:
        """Write the remaining rows and wait for every write, then the checksums and ``attrs``, then
        ``complete``. Returns the attrs written (with ``int8_cosine``, min and mean, for the int8 codec)."""
        try:
            if self.buffered:
                self._flush(self.buffered)
            for write in self._writes:
                write.result()
        finally:
            self.close()
        if self.int8:
            cosine = np.concatenate(self.cosines) if self.cosines else np.ones(1)
            attrs = {**attrs, "int8_cosine": {"min": float(cosine.min()), "mean": float(cosine.mean())}}
        self.group.attrs.update({**attrs, CHECKSUMS: {key: s.hexdigest() for key, s in self.sums.items()}})
        self.group.attrs[COMPLETE] = True
        return attrs

    def close(self) -> None:
        """Stop without committing (after an error): writes under way finish, queued ones are dropped, and the
        shard stays incomplete."""
        self._thread.shutdown(wait=True, cancel_futures=True)
