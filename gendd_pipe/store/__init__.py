"""The feature store, format version 1: a Zarr v3 group of per-shard teacher features."""
