"""Extraction against the bare teacher forward, every ratio measured side by side in one run.

    python benchmarks/extract.py [--shards 2] [--batches-per-shard 4] [--teachers tf_efficientnet_lite0 resnet50] [--views 1 10]
                                 [--amp off bf16] [--renderers pil tensor] [--devices cpu cuda] [--json]

Builds its own inputs: photo-sized JPEGs (500x375 crops of scikit-image photos) in
ImageNet-layout WebDataset shards, each shard some teacher batches long (ImageNet's
shards hold a thousand images: a shard of one batch would measure only the
per-shard start). For each device present (the CPU always, CUDA
when torch sees it), teacher, view count, precision and renderer it prints:

- efficiency: end-to-end ``extract`` images/s (read, decode, views, forward,
  compress, write) over the bare teacher forward's images/s on preprocessed
  tensors of the same model, batch, views, precision and device;
- decode headroom: images/s of extraction's input pipeline alone (read, decode,
  cut and resize every view, on its threads) over the images/s the forward consumes;

and, once per teacher, the storage (bytes on disk per view over the raw fp32
bytes of features + logits) for logits full, topk:10, derived and derived with
int8 features, and the memory
ratio: peak RSS of an extraction over 4x the shards over that of 1x (flat is 1.0).
Each side is run ``--repeats`` times in turn and its best run counts. Absolute
numbers drift on a shared machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

from gendd_pipe.runtime import normalize_pixels  # noqa: E402
from gendd_pipe.data.shards import ShardReader  # noqa: E402
from gendd_pipe.data.views import ViewConfig  # noqa: E402
from gendd_pipe.config import narrow  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract, requested_manifest  # noqa: E402
from gendd_pipe.shard_task import ShardConfig, _rendered  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig, create_teacher  # noqa: E402
from gendd_pipe.runtime import RuntimeConfig  # noqa: E402
from gendd_pipe.store.audit import summarize  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")
BATCH = 64  # views per forward


def photo_shards(root: str, images: int, per_shard: int) -> list[str]:
    """``images`` distinct 500x375 JPEGs (random crops and flips of the photos), labelled, in shards (made once
    per ``root``)."""
    import webdataset as wds

    made = [f"{root}/photos-{i:06d}.tar" for i in range(-(-images // per_shard))]
    if all(os.path.exists(url) for url in made):
        return made
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


def input_side(urls: list[str], teacher, cfg: ExtractConfig) -> tuple[float, list[torch.Tensor]]:
    """Images/s of extraction's input pipeline alone (reading, decoding and rendering every view, on its
    threads); returns the rendered views too, normalized, in teacher batches."""
    pixels, start = [], time.perf_counter()
    for url in urls:
        manifest = requested_manifest(teacher, replace(cfg, logits="full"))  # (logits play no part in rendering)
        for item in _rendered(ShardReader(url, decode=False), teacher, narrow(cfg, ShardConfig), manifest):
            pixels.append(item[2])
    seconds = time.perf_counter() - start
    dc, views = teacher.data_config, torch.cat(pixels).cpu()
    if views.dtype == torch.uint8:  # rendered for a GPU, which normalizes them
        views = normalize_pixels(views, dc["mean"], dc["std"])
    return len(pixels) / seconds, [views[i:i + BATCH] for i in range(0, len(views), BATCH)]


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
    """Images/s of a whole extraction into a new store (the teacher of this process already built)."""
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    extract(urls, store, cfg, progress=False)
    return images / (time.perf_counter() - start)


def side_by_side(urls: list[str], store: str, cfg: ExtractConfig, teacher, images: int, repeats: int) -> tuple:
    """(extract, forward, input) images/s, each the best of ``repeats`` runs taken in turn, so that a slow
    spell of a shared machine does not fall on one side only."""
    extract(urls[:1], store + ".warm", cfg, progress=False)  # builds and caches the teacher of this process
    e2e, forward, inputs = [], [], []
    for _ in range(repeats):
        rate, batches = input_side(urls, teacher, cfg)
        inputs.append(rate)
        forward.append(bare_forward(teacher, batches, cfg.views.count))
        e2e.append(end_to_end(urls, store, cfg, images))
    return max(e2e), max(forward), max(inputs)


def storage(urls: list[str], tmp: str, teacher: TeacherConfig) -> dict[str, float]:
    """Bytes on disk per view / raw fp32 bytes of features + logits per view, per logits mode."""
    out = {}
    for mode, dtype in (("full", "float16"), ("topk:10", "float16"), ("derived", "float16"), ("derived", "int8")):
        name = mode if dtype == "float16" else f"{mode}+{dtype}"
        store = f"{tmp}/storage-{name.replace(':', '')}.zarr"
        extract(urls, store, ExtractConfig(teacher=teacher, views=ViewConfig(count=2), logits=mode, features_dtype=dtype,
                                           dask_workers=0), progress=False)
        s, t = summarize(FeatureStore.open(store)), FeatureStore.open(store).manifest["teacher"]
        out[name] = s["bytes_per_view"] / (4 * (t["num_features"] + t["num_classes"]))
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
    parser.add_argument("--shards", type=int, default=2, help="input shards per measurement")
    parser.add_argument("--batches-per-shard", type=int, default=4, help="teacher batches in each shard")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--teachers", nargs="+", default=["tf_efficientnet_lite0", "resnet50"])
    parser.add_argument("--storage-teacher", default="resnet18", help="a 512-dim, 1000-class teacher")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"])
    parser.add_argument("--renderers", nargs="+", default=["pil", "tensor"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, taken in turn; the best counts")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="those present are measured")
    parser.add_argument("--json", action="store_true", help="also print one JSON line of every figure")
    args = parser.parse_args()
    devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    rows: list[dict] = []
    result = {"machine": os.uname().nodename, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"photo JPEGs (500x375), {args.shards} shards of {args.batches_per_shard} batches of {BATCH} views, "
              f"{args.input_size} px, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| device | teacher | views | amp | renderer | extract img/s | forward img/s | efficiency | "
              "input img/s | decode headroom |")
        print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
        for device in devices:
            for name in args.teachers:
                teacher_cfg = teacher_config(name, args.input_size)
                for count, amp, renderer in itertools.product(args.views, args.amp, args.renderers):
                    per_shard = args.batches_per_shard * max(1, BATCH // count)
                    images = per_shard * args.shards
                    urls = photo_shards(f"{tmp}/photos-{per_shard}", images, per_shard)
                    runtime = RuntimeConfig(device=device, amp=amp)
                    teacher = create_teacher(teacher_cfg, runtime)
                    cfg = ExtractConfig(teacher=teacher_cfg, views=ViewConfig(count=count, renderer=renderer),
                                        batch_size=BATCH, dask_workers=0, threads=os.cpu_count(), runtime=runtime)
                    store = f"{tmp}/{device}-{name}-{count}-{amp}-{renderer}.zarr"
                    e2e, forward, inputs = side_by_side(urls, store, cfg, teacher, images, args.repeats)
                    rows.append({"device": device, "teacher": name, "views": count, "amp": amp, "renderer": renderer,
                                 "extract": e2e, "forward": forward, "efficiency": e2e / forward,
                                 "input": inputs, "headroom": inputs / forward})
                    r = rows[-1]
                    print(f"| {device} | {name} | {count} | {amp} | {renderer} | {e2e:.1f} | {forward:.1f} | "
                          f"{r['efficiency']:.2f} | {inputs:.1f} | {r['headroom']:.2f} |", flush=True)
        small = teacher_config(args.storage_teacher, 64)
        per_shard = 24
        urls = photo_shards(f"{tmp}/photos-{per_shard}", 2 * per_shard, per_shard)
        result["storage"] = storage(urls, tmp, small)
        print(f"\nstorage, {args.storage_teacher} (bytes on disk per view / raw fp32 features + logits): "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["storage"].items()))
        more = photo_shards(f"{tmp}/more", 8 * per_shard, per_shard)
        one, four = peak_rss(urls, f"{tmp}/rss1.zarr", small), peak_rss(more, f"{tmp}/rss4.zarr", small)
        result["memory"] = {"peak_rss_1x": one, "peak_rss_4x": four, "ratio": four / one}
        print(f"memory: peak RSS over 4x the shards / over 1x = {four / one:.3f} ({one / 2**20:.0f} MiB, "
              f"{four / 2**20:.0f} MiB)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
