"""What checking feature-shard checksums on read costs a distill epoch, measured side by side in one run.

    python benchmarks/integrity.py [--images 1024] [--shards 4] [--views 4] [--teacher resnet50] [--repeats 3]

Builds a store of real MNIST digits (a seeded teacher: resnet50 gives ResNet-50's
2048-dim features and 1000 logits), then alternates KD epochs with the loader's
``verify`` off and on, on the same shards, and prints the epoch times, their
ratio, and the checksum time alone as a share of the epoch. The default small
student at 32 px is the worst case: the least compute for each byte checked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gendd_pipe.data.loader import LoaderConfig, train_pipeline  # noqa: E402
from gendd_pipe.data.prepare import mnist5k_records, write_shards  # noqa: E402
from gendd_pipe.data.views import ViewConfig  # noqa: E402
from gendd_pipe.distill.config import DistillConfig  # noqa: E402
from gendd_pipe.distill.methods import TeacherHead, create_method  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.models.student import StudentConfig, create_student  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig  # noqa: E402
from gendd_pipe.store.format import checksum  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402


def epoch(method, optimizer, loader) -> float:
    start = time.perf_counter()
    for batch in loader:
        loss = method(batch, 5)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = mnist5k_records()[0][:: 5000 // args.images][: args.images]
        shards = write_shards(records, f"{tmp}/shards", "bench", args.images // args.shards)
        store_url = f"{tmp}/store.zarr"
        extract(shards, store_url, ExtractConfig(teacher=TeacherConfig(args.teacher, "none", input_size=32),
                                                 views=ViewConfig(count=args.views), dask_workers=0), progress=False)
        store = FeatureStore.open(store_url)
        weight, bias = (torch.from_numpy(a) for a in store.head())
        student_cfg = StudentConfig(args.student, args.input_size)
        torch.manual_seed(0)
        method = create_method(DistillConfig(method="kd"), create_student(student_cfg, weight.shape[0]),
                               TeacherHead(weight, bias, 1.0))
        optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
        data_config = method.student.data_config
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeats + 1):  # the first round warms caches and allocators, and is not counted
            for verify in (False, True):
                loader = train_pipeline(shards, store, data_config, LoaderConfig(args.batch_size, 256, verify=verify),
                                        0, r)
                seconds = epoch(method, optimizer, loader)
                if r:
                    times[verify].append(seconds)

        arrays = [a for n in store.shard_names for a in store.read_shard(n, verify=False).values()]
        start = time.perf_counter()
        for data in arrays:
            checksum(data)
        hashing = time.perf_counter() - start
        stored = sum(a.nbytes for a in arrays)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"store: {len(store.shard_names)} shards, {args.images} images x {args.views} views, "
              f"teacher {args.teacher} ({weight.shape[1]} features, {weight.shape[0]} logits), {stored / 1e6:.1f} MB")
        print(f"KD epoch, verify off: {off:.2f} s   verify on: {on:.2f} s   ratio on/off: {on / off:.3f}")
        print(f"checksums alone: {hashing * 1000:.0f} ms = {100 * hashing / off:.2f}% of an epoch "
              f"({stored / hashing / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
