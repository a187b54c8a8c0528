"""The feature store: a Zarr v3 group of per-shard teacher features (`format`: versions, names and the shard schema;
`writer`, `reader`, `lease`, `audit`)."""
