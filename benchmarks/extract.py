"""Extraction speed, measured side by side in one run: in process against a Dask worker, 64 and 224 px.

    python benchmarks/extract.py [--images 200] [--views 4]

Prints images/s and views/s for each setting, the Dask/in-process ratio, and
the store's bytes per view and compression ratio. Absolute numbers drift on a
shared machine; the ratios printed are what to compare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gendd_pipe.data.prepare import mnist5k_records, write_shards  # noqa: E402
from gendd_pipe.data.views import ViewConfig  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.store.audit import summarize  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402


def timed(shards: list[str], store: str, cfg: ExtractConfig) -> float:
    start = time.perf_counter()
    extract(shards, store, cfg, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(mnist5k_records()[0][: args.images], f"{tmp}/shards", "bench", max(1, args.images // 2))
        print(f"{args.images} MNIST digits x {args.views} views, tf_efficientnet_lite0 (bundled weights)")
        print(f"{'input':>6} {'in-process img/s':>17} {'dask img/s':>11} {'dask/in-process':>16} {'bytes/view':>11} {'vs fp32':>8}")
        for size in (64, 224):
            cfg = ExtractConfig(teacher=TeacherConfig(input_size=size), views=ViewConfig(count=args.views), dask_workers=0)
            local = timed(shards, f"{tmp}/local-{size}.zarr", cfg)
            dask = timed(shards, f"{tmp}/dask-{size}.zarr", replace(cfg, dask_workers=1))
            s = summarize(FeatureStore.open(f"{tmp}/local-{size}.zarr"))
            print(f"{size:>6} {args.images / local:>17.1f} {args.images / dask:>11.1f} {local / dask:>16.2f} "
                  f"{s['bytes_per_view']:>11,.0f} {s['compression_ratio']:>7.2f}x")


if __name__ == "__main__":
    main()
