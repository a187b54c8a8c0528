"""Opening a feature store: the Python API a team uses without ever seeing the teacher.

    >>> store = FeatureStore.open("s3://bucket/store.zarr")
    >>> store.manifest["teacher"]["name"], store.num_samples
    >>> weight, bias = store.head()
    >>> shard = store.shard("train-000000"); shard["labels"][:8]     # zarr arrays
    >>> store.view_features("train-000000", view=0)                  # (n, D) float32, any codec
    >>> lazy = store.to_dask()                                       # whole-store dask arrays

Only shards whose ``complete`` attribute is set are visible, each with the store's count of views (a shard
grown ahead of the others, `gendd_pipe.extract`, is read at that count until every shard has its views). `read_shard` checks
what it reads against the checksums written with the shard, so a flipped byte,
a lost chunk or a truncated array is an error naming the shard and the array,
never silently wrong features.
"""

from __future__ import annotations

import numpy as np
import zarr

from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.storage import nothing_at, storage_errors
from gendd_pipe.store.format import (CHECKSUMS, COMPLETE, HEAD_BIAS, HEAD_WEIGHT, MANIFEST_ATTR, READABLE_VERSIONS,
                                     SHARDS, checksum, dequantize_int8, derive_logits, is_int8, shard_schema,
                                     shard_views)


class FeatureStore:
    """A read-only view of a feature store (any of `READABLE_VERSIONS`)."""

    def __init__(self, root: zarr.Group, url: str):
        self.root, self.url = root, url
        self._head: tuple[np.ndarray, np.ndarray] | None = None
        if MANIFEST_ATTR not in root.attrs:
            raise GenddError(f"{public_url(url)}: not a gendd-pipe feature store (no '{MANIFEST_ATTR}' manifest)")
        self.manifest: dict = dict(root.attrs[MANIFEST_ATTR])
        if self.manifest.get("format_version") not in READABLE_VERSIONS:
            raise GenddError(f"{public_url(url)}: format version {self.manifest.get('format_version')} is not one "
                             f"this version of gendd-pipe reads ({', '.join(map(str, READABLE_VERSIONS))})")

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> "FeatureStore":
        """Open a store by local path or fsspec URL (``s3://``, ``gs://``, ``file://`` ...), read-only: nothing is
        written, so a read-only directory or read-only credentials do."""
        with storage_errors(url, "open the store"):
            try:
                root = zarr.open_group(url, mode="r", zarr_format=3, storage_options=storage_options)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as exc:
                raise nothing_at(url, "feature store") from exc
            return cls(root, url)

    @property
    def shard_names(self) -> list[str]:
        """Complete shards, in manifest order, then any complete ones the manifest does not list yet."""
        group = self.root.get(SHARDS)
        present = {name for name, g in group.groups() if g.attrs.get(COMPLETE)} if group is not None else set()
        listed = [s["name"] for s in self.manifest["shards"] if s["name"] in present]
        return listed + sorted(present - set(listed))

    @property
    def logits_mode(self) -> str:
        return self.manifest["logits"]["mode"]

    @property
    def num_views(self) -> int:
        return self.manifest["views"]["count"]

    @property
    def num_samples(self) -> int:
        return sum(int(self.shard(n).attrs["count"]) for n in self.shard_names)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's classifier: weight (C, D) and bias (C,), float32 (read once)."""
        if self._head is None:
            self._head = self.root[HEAD_WEIGHT][...], self.root[HEAD_BIAS][...]
        return self._head

    def logits(self, data: dict[str, np.ndarray]) -> np.ndarray:
        """The full teacher logits of a `read_shard` result: stored (mode full) or computed from the features
        through the stored head (mode derived), float32 (n, V, C)."""
        if "logits" in data:
            return data["logits"].astype(np.float32)
        if self.logits_mode != "derived":
            raise GenddError(f"{public_url(self.url)}: keeps {self.logits_mode} logits, not full ones")
        return derive_logits(data["features"], *self.head())

    def teacher_outputs(self, data: dict[str, np.ndarray], row: int, view: int) -> dict[str, np.ndarray]:
        """What a student trains against from one view of one row of a `read_shard` result, float32: its
        ``feature`` (D,), and its ``logits`` (C,) where the store keeps them whole (mode full). A derived store's
        logits are its features through the head, made for a whole batch at once where the student trains; a
        top-k store's cannot be made whole."""
        out = {"feature": data["features"][row, view].astype(np.float32)}
        if "logits" in data:
            out["logits"] = data["logits"][row, view].astype(np.float32)
        return out

    def shard(self, name: str) -> zarr.Group:
        """One complete feature shard; its arrays are lazy zarr arrays."""
        group = self.root.get(f"{SHARDS}/{name}")
        if group is None or not group.attrs.get(COMPLETE):
            raise GenddError(f"{public_url(self.url)}: shard {name!r} is missing or incomplete")
        return group

    def read_shard(self, name: str, verify: bool = True) -> dict[str, np.ndarray]:
        """All arrays of one shard as numpy, read in one go (what the student's loader does per shard).

        Raises:
            GenddError: an array is missing, unreadable, of the wrong length or (``verify``) does not match
                its checksum.
        """
        data, problems = self.check_arrays(name, verify)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise GenddError(f"{public_url(self.url)}: {problems[0]}{more}; re-extract the shard")
        if is_int8(self.manifest):  # features as float32 again; the checksums were of the stored int8
            data["features"] = dequantize_int8(data["features"], data.pop("feature_scales"), self._rows_per_scale)
        return data

    @property
    def _rows_per_scale(self) -> int:
        return int(self.manifest["storage"]["chunk_size"])

    def view_features(self, name: str, view: int = 0) -> np.ndarray:
        """One view's features of every sample of a shard, float32 (n, D), read without the other views'."""
        group = self.shard(name)
        features = group["features"][:, view]
        if is_int8(self.manifest):
            return dequantize_int8(features, group["feature_scales"][...], self._rows_per_scale)
        return features.astype(np.float32)

    def feature(self, name: str, row: int, view: int) -> np.ndarray:
        """One stored feature, float32 (D,)."""
        group = self.shard(name)
        feature = group["features"][row : row + 1, view]
        if is_int8(self.manifest):
            return dequantize_int8(feature, group["feature_scales"][...], self._rows_per_scale, start=row)[0]
        return feature[0].astype(np.float32)

    def check_arrays(self, name: str, verify: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
        """Read one shard's arrays; returns them and the problems found (missing, unreadable, short, checksum)."""
        group = self.shard(name)
        n, held = int(group.attrs["count"]), shard_views(group, self.num_views)
        sums = dict(group.attrs.get(CHECKSUMS) or {})  # stores written before checksums have none
        data, problems = {}, []
        if held < self.num_views:
            return data, [f"shard {name}: holds {held} views per row, the store {self.num_views}"]
        for key, spec in shard_schema(self.manifest).items():
            try:  # a shard grown ahead of the store holds more views than it reads: its checksum covers them
                data[key] = group[key][:, :held] if spec.per_view else group[key][...]
            except KeyError:
                problems.append(f"shard {name}: array {key} is missing")
                continue
            except Exception as exc:  # a codec or the filesystem failing on damaged bytes
                problems.append(f"shard {name}: array {key} cannot be read ({str(exc).splitlines()[0][:120]})")
                continue
            rows = spec.rows(n, self._rows_per_scale)
            if len(data[key]) != rows:
                problems.append(f"shard {name}: {key} has {len(data[key])} rows, count says {rows}")
            elif verify and key in sums and checksum(data[key]) != sums[key]:
                problems.append(f"shard {name}: array {key} does not match its checksum (damaged or rewritten)")
            if spec.per_view and held > self.num_views:
                data[key] = data[key][:, :self.num_views]
        return data, problems

    def to_dask(self) -> dict:
        """Whole-store dask arrays (concatenated over complete shards, in `shard_names` order)."""
        import dask.array as da

        names = self.shard_names
        if not names:
            raise GenddError(f"{public_url(self.url)}: no complete shards")
        keys = [k for k, _ in self.shard(names[0]).arrays() if k != "keys"]
        return {k: da.concatenate([da.from_zarr(self.shard(n)[k]) for n in names]) for k in keys}

    def __repr__(self) -> str:
        t = self.manifest["teacher"]
        return (f"FeatureStore({public_url(self.url)!r}, teacher={t['name']}, shards={len(self.shard_names)}, "
                f"views={self.num_views})")
