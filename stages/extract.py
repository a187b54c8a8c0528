"""Stage `extract`: run the teacher over the prepared shards into the feature store."""

from __future__ import annotations

import time

from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.inspect import summarize
from gendd_pipe.store.reader import FeatureStore
from gendd_pipe.config import build
from stages.params import load_section, stage_args, write_json


def run(section: dict) -> dict:
    """``section``: shards (patterns), out (store), metrics (json path) and the ExtractConfig fields."""
    io_keys = ("shards", "out", "metrics")
    cfg = build(ExtractConfig, {k: v for k, v in section.items() if k not in io_keys}, "extract")
    start = time.perf_counter()
    manifest = extract(section["shards"], section["out"], cfg)
    seconds = time.perf_counter() - start
    summary = summarize(FeatureStore.open(section["out"]))
    metrics = {
        "samples": summary["samples"],
        "images_per_s": summary["samples"] / seconds,
        "bytes_per_view": summary["bytes_per_view"],
        "compression_ratio": summary["compression_ratio"],
        "skipped": len(manifest["skipped"]),
    }
    write_json(section["metrics"], metrics)  # the settings are in the store's manifest
    return metrics


if __name__ == "__main__":
    run(load_section("extract", stage_args("extract").params))
