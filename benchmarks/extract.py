"""Extraction against the bare teacher forward, every ratio measured side by side in one run.

    python benchmarks/extract.py [--images 48] [--teachers tf_efficientnet_lite0 resnet50] [--views 1 10]
                                 [--amp off bf16] [--devices cpu cuda] [--json]

Builds its own inputs: photo-sized JPEGs (500x375 crops of scikit-image photos) in
ImageNet-layout WebDataset shards. For each device present (the CPU always, CUDA
when torch sees it), teacher, view count and precision it prints:

- efficiency: end-to-end ``extract`` images/s (read, decode, views, forward,
  compress, write) over the bare teacher forward's images/s on preprocessed
  tensors of the same model, batch, views, precision and device;
- decode headroom: images/s of the input side alone (read, decode, cut and
  resize every view) over the images/s the forward consumes;

and, once per teacher, the storage (bytes on disk per view over the raw fp32
bytes of features + logits) for logits full, topk:10 and derived, and the memory
ratio: peak RSS of an extraction over 4x the shards over that of 1x (flat is 1.0).
Absolute numbers drift on a shared machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

from gendd_pipe.data.shards import Sample, ShardReader  # noqa: E402
from gendd_pipe.data.views import ViewConfig, render_view, sample_views, to_tensor  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig, create_teacher  # noqa: E402
from gendd_pipe.runtime import RuntimeConfig  # noqa: E402
from gendd_pipe.store.audit import summarize  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")
BATCH = 64  # views per forward


def photo_shards(root: str, images: int, per_shard: int) -> list[str]:
    """``images`` distinct 500x375 JPEGs (random crops and flips of the photos), labelled, in shards."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]
    os.makedirs(root, exist_ok=True)
    urls = []
    for start in range(0, images, per_shard):
        urls.append(f"{root}/photos-{start // per_shard:06d}.tar")
        with wds.TarWriter(urls[-1], mtime=0.0) as sink:
            for i in range(start, min(images, start + per_shard)):
                photo = photos[i % len(photos)]
                scale = max(500 / photo.width, 375 / photo.height) * rng.uniform(1.0, 1.5)
                big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
                left, top = rng.integers(0, big.width - 500 + 1), rng.integers(0, big.height - 375 + 1)
                crop = big.crop((left, top, left + 500, top + 375))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": i % len(photos)})
    return urls


def input_side(urls: list[str], teacher, views: ViewConfig) -> tuple[float, list[torch.Tensor]]:
    """Images/s of reading, decoding and rendering every view alone; returns the rendered batches too."""
    dc, size = teacher.data_config, teacher.input_hw
    tensors, start = [], time.perf_counter()
    for url in urls:
        for sample in ShardReader(url):
            if isinstance(sample, Sample):
                for view in sample_views(sample.key, *sample.image.size, views, size, dc["crop_pct"],
                                         dc.get("crop_mode", "center")):
                    tensors.append(to_tensor(render_view(sample.image, view, size, dc["interpolation"]),
                                             dc["mean"], dc["std"]))
    seconds = time.perf_counter() - start
    return len(tensors) / views.count / seconds, [torch.stack(tensors[i:i + BATCH]) for i in range(0, len(tensors), BATCH)]


def bare_forward(teacher, batches: list[torch.Tensor], views_per_image: int) -> float:
    """Images/s of the teacher forward alone on preprocessed tensors (after one warm-up batch)."""
    teacher(batches[0])
    if teacher.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
        torch.cuda.synchronize()
    start = time.perf_counter()
    views = 0
    for batch in batches:
        teacher(batch)  # returns CPU tensors, so the device work is finished
        views += len(batch)
    return views / views_per_image / (time.perf_counter() - start)


def end_to_end(urls: list[str], store: str, cfg: ExtractConfig, images: int) -> float:
    extract(urls[:1], store + ".warm", cfg, progress=False)  # builds and caches the teacher of this process
    start = time.perf_counter()
    extract(urls, store, cfg, progress=False)
    return images / (time.perf_counter() - start)


def storage(urls: list[str], tmp: str, teacher: TeacherConfig) -> dict[str, float]:
    """Bytes on disk per view / raw fp32 bytes of features + logits per view, per logits mode."""
    out = {}
    for mode in ("full", "topk:10", "derived"):
        store = f"{tmp}/storage-{mode.replace(':', '')}.zarr"
        extract(urls, store, ExtractConfig(teacher=teacher, views=ViewConfig(count=2), logits=mode, dask_workers=0),
                progress=False)
        s, t = summarize(FeatureStore.open(store)), FeatureStore.open(store).manifest["teacher"]
        out[mode] = s["bytes_per_view"] / (4 * (t["num_features"] + t["num_classes"]))
    return out


def peak_rss(urls: list[str], store: str, teacher: TeacherConfig) -> int:
    """Peak RSS (bytes) of a fresh process extracting ``urls``."""
    script = (
        "import resource, sys; from gendd_pipe.extract import ExtractConfig, extract; "
        "from gendd_pipe.models.teacher import TeacherConfig; from gendd_pipe.data.views import ViewConfig; "
        f"extract({urls!r}, {store!r}, ExtractConfig(teacher=TeacherConfig({teacher.name!r}, {teacher.weights!r}, "
        f"input_size={teacher.input_size!r}), views=ViewConfig(count=2), dask_workers=0), progress=False); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) * 1024


def teacher_config(name: str, size: int) -> TeacherConfig:
    weights = "bundled:efficientnet-lite0" if name == "tf_efficientnet_lite0" else "none"
    return TeacherConfig(name, weights, input_size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="photos per measurement")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--teachers", nargs="+", default=["tf_efficientnet_lite0", "resnet50"])
    parser.add_argument("--storage-teacher", default="resnet18", help="a 512-dim, 1000-class teacher")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="those present are measured")
    parser.add_argument("--json", action="store_true", help="also print one JSON line of every figure")
    args = parser.parse_args()
    devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    rows: list[dict] = []
    result = {"machine": os.uname().nodename, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = max(1, args.images // 2)
        urls = photo_shards(f"{tmp}/photos", args.images, per_shard)
        print(f"{args.images} photo JPEGs (500x375) in {len(urls)} shards, {args.input_size} px, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| device | teacher | views | amp | extract img/s | forward img/s | efficiency | input img/s | "
              "decode headroom |")
        print("|---|---|---:|---|---:|---:|---:|---:|---:|")
        for device in devices:
            for name in args.teachers:
                teacher_cfg = teacher_config(name, args.input_size)
                for count in args.views:
                    views = ViewConfig(count=count)
                    for amp in args.amp:
                        runtime = RuntimeConfig(device=device, amp=amp)
                        teacher = create_teacher(teacher_cfg, runtime)
                        inputs, batches = input_side(urls, teacher, views)
                        forward = bare_forward(teacher, batches, count)
                        cfg = ExtractConfig(teacher=teacher_cfg, views=views, batch_size=BATCH, dask_workers=0,
                                            runtime=runtime)
                        e2e = end_to_end(urls, f"{tmp}/{device}-{name}-{count}-{amp}.zarr", cfg, args.images)
                        rows.append({"device": device, "teacher": name, "views": count, "amp": amp,
                                     "extract": e2e, "forward": forward, "efficiency": e2e / forward,
                                     "input": inputs, "headroom": inputs / forward})
                        r = rows[-1]
                        print(f"| {device} | {name} | {count} | {amp} | {e2e:.1f} | {forward:.1f} | "
                              f"{r['efficiency']:.2f} | {inputs:.1f} | {r['headroom']:.2f} |", flush=True)
        small = teacher_config(args.storage_teacher, 64)
        result["storage"] = storage(urls, tmp, small)
        print(f"\nstorage, {args.storage_teacher} (bytes on disk per view / raw fp32 features + logits): "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["storage"].items()))
        more = photo_shards(f"{tmp}/more", args.images * 4, per_shard)
        one, four = peak_rss(urls, f"{tmp}/rss1.zarr", small), peak_rss(more, f"{tmp}/rss4.zarr", small)
        result["memory"] = {"peak_rss_1x": one, "peak_rss_4x": four, "ratio": four / one}
        print(f"memory: peak RSS over 4x the shards / over 1x = {four / one:.3f} ({one / 2**20:.0f} MiB, "
              f"{four / 2**20:.0f} MiB)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
