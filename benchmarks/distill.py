"""Distill speed from the cache, measured side by side in one run: the loader alone, then a training
step of each method, and the GenDD head's cost knobs (width, diffusion_batch_mul).

    python benchmarks/distill.py [--images 512] [--steps 12] [--student resnet10t] [--input-size 32]

Builds a small store of real MNIST digits (a seeded resnet18 teacher at 32 px),
then times ``steps`` training steps per setting on the same batches. Prints
images/s and the ratio to the CE step. Absolute numbers drift on a shared
machine; the ratios printed are what to compare.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gendd_pipe.data.loader import LoaderConfig, train_pipeline  # noqa: E402
from gendd_pipe.data.prepare import mnist5k_records, write_shards  # noqa: E402
from gendd_pipe.distill.config import DistillConfig  # noqa: E402
from gendd_pipe.distill.methods import TeacherHead, create_method  # noqa: E402
from gendd_pipe.distill.methods.gendd import GenddConfig  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.models.gendd_head import HeadConfig  # noqa: E402
from gendd_pipe.models.student import StudentConfig, create_student  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--input-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(mnist5k_records()[0][:: 5000 // args.images][: args.images], f"{tmp}/shards", "bench",
                              args.images)
        store_url = f"{tmp}/store.zarr"
        extract(shards, store_url, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32), dask_workers=0),
                progress=False)
        store = FeatureStore.open(store_url)
        weight, bias = (torch.from_numpy(a) for a in store.head())
        teacher = TeacherHead(weight, bias, 1.0)
        student_cfg = StudentConfig(args.student, args.input_size)
        data_config = create_student(student_cfg, 1000).data_config
        loader = train_pipeline(shards, store, data_config, LoaderConfig(args.batch_size, 256), 0, 0)

        start = time.perf_counter()
        batches = list(itertools.islice(loader, args.steps))
        loader_rate = args.steps * args.batch_size / (time.perf_counter() - start)
        print(f"loader alone: {loader_rate:,.0f} images/s (decode, view replay, join)")

        settings = [("ce", None), ("kd", None), ("dkd", None), ("gdkd", None)]
        for width, mul in ((1024, 10), (256, 10), (256, 4), (128, 2)):
            settings.append(("gendd", HeadConfig(width=width, diffusion_batch_mul=mul)))
        base = None
        for name, head in settings:
            torch.manual_seed(0)
            cfg = DistillConfig(method=name, options=GenddConfig(head=head) if head else None)
            method = create_method(cfg, create_student(student_cfg, 1000), teacher)
            optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
            method(batches[0], 0)["loss"].backward()  # warm up allocators outside the timing
            optimizer.zero_grad()
            start = time.perf_counter()
            for batch in batches:
                loss = method(batch, 5)["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rate = args.steps * args.batch_size / (time.perf_counter() - start)
            base = base or rate
            label = name if head is None else f"gendd width {head.width} mul {head.diffusion_batch_mul}"
            print(f"{label:28s} {rate:8,.0f} images/s   x{rate / base:.2f} of ce")


if __name__ == "__main__":
    main()
