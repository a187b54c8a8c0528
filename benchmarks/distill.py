"""Distill from the cache against the teacher run online, measured side by side in one run on each device.

    python benchmarks/distill.py [--images 192] [--batch-size 32] [--steps 4] [--input-size 224]
        [--student resnet18] [--light resnet34] [--heavy resnet152] [--checkpoint PATH --val-shards GLOB]

Real MNIST digits are written as shards and extracted (weights none, two views) by
each teacher; every timing then trains the same student on the same batches:

- cache speedup: a step of a run naming a live teacher (its loader rendering a fresh
  view of each image for both networks, the teacher's forward of the batch under
  no_grad, then the student's step: the official way, as `distill` runs it) over a
  step from the cache (the loader, its workers running beside the step, then the
  student's step); cache efficiency: that speedup over its bound
  ``(t_teacher + t_student) / t_student``, the four times measured in the same run.
- loader headroom: samples/s of the loader alone over the samples/s the step consumes.
- loader against its peer: samples/s of one worker of the training loader (as it feeds
  a GPU) over one of the loader a timm user writes (webdataset, PIL decode, timm's
  RandomResizedCropAndInterpolation, flip, uint8), on the same photo-sized JPEG shards
  at ``--input-size``, on a quiet machine and with one core kept busy beside them.
- GenDD cost: a GenDD step over a KD step, at the official head (width 1024, depth 3,
  mul 10, 64-dim tokens) and at the embedded default's (params.yaml); on the CPU in
  float32 and under bf16 autocast.
- sampling: with ``--checkpoint`` (the embedded default's GenDD run), evaluation
  images/s and top-1 at 64 / 16 / 8 steps, ancestral and DDIM, cfg 1 and 2.

On a GPU the student runs under bf16 autocast with channels_last; on the CPU in
float32. Prints a markdown table per device and one JSON line of its figures.
Absolute times drift on a shared machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from gendd_pipe.data.loader import LoaderConfig, train_pipeline  # noqa: E402
from gendd_pipe.data.streams import workers  # noqa: E402
from gendd_pipe.data.prepare import mnist5k_records, write_shards  # noqa: E402
from gendd_pipe.data.shards import shard_name  # noqa: E402
from gendd_pipe.data.views import ViewConfig  # noqa: E402
from gendd_pipe.distill.config import DistillConfig  # noqa: E402
from gendd_pipe.distill.evaluate import evaluate, load_method  # noqa: E402
from gendd_pipe.distill.methods import create_method  # noqa: E402
from gendd_pipe.distill.methods.gendd import GenddConfig  # noqa: E402
from gendd_pipe.distill.live import LiveTeacher, LiveTeacherConfig, LiveViews  # noqa: E402
from gendd_pipe.distill.train import _on_device, derived_head, teacher_head  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.models.gendd_head import HeadConfig, SamplingConfig  # noqa: E402
from gendd_pipe.models.student import StudentConfig, create_student  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig  # noqa: E402
from gendd_pipe.runtime import RuntimeConfig, autocast, grad_scaler, place, resolve_device  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One method's training step on a device, as the distill loop runs it (autocast, scaler, AdamW)."""

    def __init__(self, cfg: DistillConfig, store: FeatureStore, shard: str, runtime: RuntimeConfig,
                 device: torch.device):
        torch.manual_seed(0)
        student = create_student(cfg.student, store.manifest["teacher"]["num_classes"])
        self.method = place(create_method(cfg, student, teacher_head(store, shard)), runtime, device)
        self.optimizer = torch.optim.AdamW(self.method.parameters(), lr=1e-4)
        self.scaler, self.runtime, self.device = grad_scaler(runtime, device), runtime, device
        self.data_config = student.data_config

    def step(self, batch: dict) -> None:
        """One step on a batch already on the device."""
        with autocast(self.runtime, self.device):
            loss = self.method(batch, 5)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def step_on(self, batches: list[dict]):
        """``index -> one step on batches[index]``, for `seconds_per`."""
        return lambda index: self.step(batches[index])


def seconds_per(fn, items: list, device: torch.device, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds of ``fn(item)`` over ``items``, after one warm-up call."""
    fn(items[0])
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        _sync(device)
        times.append((time.perf_counter() - start) / len(items))
    return statistics.median(times)


def loader_steps(trainer: Trainer, loader, steps: int, device: torch.device, repeats: int, head=None,
                 live: LiveTeacher | None = None) -> float:
    """Seconds per step of the loader (its workers running beside) feeding ``trainer`` as the distill loop feeds
    it (`_on_device`: with ``live``, the live teacher's forward of each batch), median of ``repeats`` epochs; the
    first batch of each epoch, which waits for the workers to start, is not timed."""
    times = []
    for epoch in range(repeats):
        loader.dataset.set_epoch(epoch)
        batches = iter(loader)
        trainer.step(_on_device(next(batches), trainer.data_config, trainer.runtime, device, head, live))
        _sync(device)
        start = time.perf_counter()
        for batch in itertools.islice(batches, steps):
            trainer.step(_on_device(batch, trainer.data_config, trainer.runtime, device, head, live))
        _sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def loader_rate(loader, steps: int, batch_size: int) -> float:
    """Samples/s of the loader alone (after its first batch)."""
    loader.dataset.set_epoch(0)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    n = sum(1 for _ in itertools.islice(batches, steps))
    return n * batch_size / (time.perf_counter() - start)


def photo_shards(root: str, images: int) -> list[str]:
    """Two shards of ``images`` photo-sized JPEGs (scikit-image's photos, 300 to 640 px, quality 90, each a
    different crop so that no two are alike) with ImageNet-style labels."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image
    from skimage import data as skdata

    photos = [getattr(skdata, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")]
    rng = np.random.default_rng(0)
    urls = []
    for shard in range(2):
        url = f"{root}/photos-{shard:06d}.tar"
        with wds.TarWriter(url, mtime=0.0) as sink:
            for i in range(shard * images // 2, (shard + 1) * images // 2):
                photo = photos[i % len(photos)]
                h, w = photo.shape[:2]
                top, left = rng.integers(0, h // 8), rng.integers(0, w // 8)
                buf = io.BytesIO()
                Image.fromarray(photo[top:, left:]).convert("RGB").save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": i % 1000})
        urls.append(url)
    return urls


def peer_loader(urls: list[str], size: int, interpolation: str, batch_size: int, num_workers: int):
    """The loader a timm user writes: webdataset, PIL decode, timm's RandomResizedCropAndInterpolation (at the
    training loader's interpolation), flip, uint8 out."""
    import webdataset as wds
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms

    transform = transforms.Compose([RandomResizedCropAndInterpolation(size, interpolation=interpolation),
                                    transforms.RandomHorizontalFlip(),
                                    transforms.PILToTensor()])
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(transform, int))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


def samples_per_s(loader, batch_size: int, batches: int) -> float:
    """Samples/s of a loader over ``batches`` batches after its first (the workers' start)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = sum(1 for _ in itertools.islice(it, batches))
    return n * batch_size / (time.perf_counter() - start)


def peer_rows(args, tmp: str) -> dict:
    """The training loader (as it feeds a GPU: workers at the loop's priority) against `peer_loader`, one worker
    each, on the same photo shards at ``--input-size``, alternated ``--repeats`` times, on a quiet machine and with
    one core kept busy beside them by a process spinning at normal priority (as a GPU rank's loop spins)."""
    import subprocess
    import sys

    urls = photo_shards(tmp, args.peer_images)
    store = f"{tmp}/photos.zarr"
    extract(urls, store, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=args.input_size),
                                       views=ViewConfig(count=2), dask_workers=0), progress=False)
    data_config = create_student(StudentConfig(args.student, args.input_size), 1000).data_config
    interpolation = FeatureStore.open(store).manifest["preprocessing"]["interpolation"]  # what replay resamples with
    cfg = LoaderConfig(args.batch_size, shuffle_buffer=args.batch_size, num_workers=1)
    batches = args.peer_images // args.batch_size - 2
    rows = {}
    for load in ("quiet", "one core busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "quiet" else None
        try:
            ours, theirs = [], []
            for _ in range(args.repeats):
                loader = train_pipeline(urls, FeatureStore.open(store), data_config, cfg, 0, cuda=True)
                ours.append(samples_per_s(loader, args.batch_size, batches))
                del loader
                peer = peer_loader(urls, args.input_size, interpolation, args.batch_size, 1)
                theirs.append(samples_per_s(peer, args.batch_size, batches))
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
        ours_rate, peer_rate = statistics.median(ours), statistics.median(theirs)
        rows[load] = {"ours": ours_rate, "peer": peer_rate, "ratio": ours_rate / peer_rate}
    return rows


def peer_table(rows: dict, args) -> str:
    lines = [f"### loader against the plain webdataset + timm loader (1 worker each, {args.peer_images} photos, "
             f"{args.input_size} px, batch {args.batch_size})", "", "| machine | ours samples/s | peer samples/s | "
             "ratio |", "|---|---:|---:|---:|"]
    for load, r in rows.items():
        lines.append(f"| {load} | {r['ours']:.0f} | {r['peer']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def embedded_head() -> HeadConfig:
    with open(os.path.join(ROOT, "params.yaml")) as f:
        params = yaml.safe_load(f)
    return HeadConfig(**params["distill"]["runs"]["gendd"]["gendd"]["head"])


def bench_device(args, device: torch.device, stores: dict, shards: list[str]) -> dict:
    runtime = RuntimeConfig(device=str(device), amp="bf16" if device.type == "cuda" else "off",
                            channels_last=device.type == "cuda")
    student = StudentConfig(args.student, args.input_size)
    loader_cfg = LoaderConfig(args.batch_size, shuffle_buffer=args.batch_size)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "precision": runtime.precision, "student": args.student, "batch_size": args.batch_size,
                 "input_size": args.input_size, "loader_workers": workers(None)}
    for role, name in (("light", args.light), ("heavy", args.heavy)):
        store = FeatureStore.open(stores[name])
        data_config = create_student(student, 1000).data_config
        loader = train_pipeline(shards, store, data_config, loader_cfg, 0, cuda=device.type == "cuda")
        trainer = Trainer(DistillConfig(method="kd", student=student), store, shard_name(shards[0]),
                          runtime, device)
        head = derived_head(teacher_head(store, shard_name(shards[0])), "kd", device)
        batches = [_on_device(b, trainer.data_config, runtime, device, head)
                   for b in itertools.islice(loader, args.steps)]
        # the product's online path: a run naming a live teacher (its loader renders a fresh view of each image
        # for both networks, the teacher runs on the batch under no_grad, then the student's step)
        live = LiveTeacher(LiveTeacherConfig(name=name, weights="none", input_size=args.input_size,
                                             views=LiveViews(scale=store.manifest["views"]["scale"])),
                           runtime, device)
        online = live.pipeline(shards, data_config, loader_cfg, 0, 0, live.check(shards, False),
                               cuda=device.type == "cuda")
        pixels = [b["teacher_image"] for b in itertools.islice(online, args.steps)]  # uint8, as loaders give them
        t_teacher = seconds_per(lambda i: live.outputs(pixels[i]), range(args.steps), device, args.repeats)
        t_student = seconds_per(lambda i: trainer.step(batches[i]), range(args.steps), device, args.repeats)
        t_online = loader_steps(trainer, online, args.steps, device, args.repeats, head, live)
        t_cache = loader_steps(trainer, loader, args.steps, device, args.repeats, head)
        speedup, bound = t_online / t_cache, (t_teacher + t_student) / t_student
        out[role] = {"teacher": name, "teacher_s": t_teacher, "student_s": t_student, "online_s": t_online,
                     "cache_s": t_cache, "cache_speedup": speedup, "bound": bound, "cache_efficiency": speedup / bound}
        if role == "light":
            rate = loader_rate(loader, args.steps, args.batch_size)
            out["loader"] = {"samples_per_s": rate, "step_samples_per_s": args.batch_size / t_student,
                             "headroom": rate * t_student / args.batch_size}
            out["gendd"] = {}
            for amp in (runtime.amp, "bf16") if runtime.amp == "off" else (runtime.amp,):  # the CPU: both
                placed = dataclasses.replace(runtime, amp=amp)
                kd = t_student if amp == runtime.amp else seconds_per(
                    Trainer(DistillConfig(method="kd", student=student), store, shard_name(shards[0]), placed,
                            device).step_on(batches), range(args.steps), device, args.repeats)
                for label, head in (("official", HeadConfig()), ("embedded default", embedded_head())):
                    gendd = Trainer(DistillConfig(method="gendd", student=student, options=GenddConfig(head=head)),
                                    store, shard_name(shards[0]), placed, device)
                    t = seconds_per(gendd.step_on(batches), range(args.steps), device, args.repeats)
                    out["gendd"][f"{label}, {placed.precision}"] = {
                        "head": f"width {head.width}, depth {head.depth}, mul {head.diffusion_batch_mul}",
                        "name": label, "precision": placed.precision,
                        "step_s": t, "kd_step_s": kd, "cost": t / kd}
    if args.checkpoint:
        out["sampling"] = sampling_table(args, runtime, device)
    return out


def sampling_table(args, runtime: RuntimeConfig, device: torch.device) -> list[dict]:
    method, _, _ = load_method(args.checkpoint)
    place(method, runtime, device)
    val = sorted(glob.glob(args.val_shards))
    rows = []
    for steps, sampler, cfg in itertools.product((64, 16, 8), ("ddpm", "ddim"), (1.0, 2.0)):
        predict = SamplingConfig(sampling_steps=steps, sampler=sampler, cfg=cfg, samples=args.samples)
        result = evaluate(method, val, 128, predict, runtime=runtime)
        rows.append({"steps": steps, "sampler": sampler, "cfg": cfg, "top1": result["gendd"]["top1"],
                     "images_per_s": result["images"] / result["seconds"]})
    return rows


def table(r: dict) -> str:
    lines = [f"### {r['device']} ({r['precision']}, student {r['student']}, batch {r['batch_size']}, "
             f"{r['input_size']} px, {r['loader_workers']} loader workers)", "",
             "| ratio | setting | value | times (s per step) |", "|---|---|---:|---|"]
    for role in ("light", "heavy"):
        x = r[role]
        times = (f"teacher {x['teacher_s']:.3f}, student {x['student_s']:.3f}, online {x['online_s']:.3f}, "
                 f"cache {x['cache_s']:.3f}")
        lines.append(f"| cache speedup | {x['teacher']} | {x['cache_speedup']:.2f} | {times} |")
        lines.append(f"| cache efficiency | {x['teacher']} (bound {x['bound']:.2f}) | {x['cache_efficiency']:.2f} | |")
    lo = r["loader"]
    lines.append(f"| loader headroom | {lo['samples_per_s']:.0f} / {lo['step_samples_per_s']:.0f} samples/s | "
                 f"{lo['headroom']:.1f} | |")
    for g in r["gendd"].values():
        lines.append(f"| GenDD cost | {g['name']} head ({g['head']}), {g['precision']} | {g['cost']:.2f} | "
                     f"gendd {g['step_s']:.3f}, "
                     f"kd {g['kd_step_s']:.3f} |")
    for row in r.get("sampling", []):
        lines.append(f"| sampling | {row['steps']} steps {row['sampler']} cfg {row['cfg']:g} | top-1 {row['top1']:.2f} "
                     f"| {row['images_per_s']:.0f} images/s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="digits written as shards (two shards); an "
                                                                "epoch must hold steps + 1 batches")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per figure (the median is kept)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--light", default="resnet34", help="the light teacher (weights none)")
    parser.add_argument("--heavy", default="resnet152", help="the heavy teacher (weights none)")
    parser.add_argument("--checkpoint", help="a GenDD checkpoint for the sampling rows (the embedded default's "
                                             "data/distill/runs/gendd/last.safetensors)")
    parser.add_argument("--val-shards", default=os.path.join(ROOT, "data/shards/val-*.tar"))
    parser.add_argument("--samples", type=int, default=4, help="sampled features per image in the sampling rows")
    parser.add_argument("--devices", nargs="*", help="default: cpu, and cuda when there is one")
    parser.add_argument("--peer-images", type=int, default=320, help="photos of the loader-against-peer rows")
    parser.add_argument("--peer-only", action="store_true", help="the loader-against-peer rows alone")
    args = parser.parse_args()
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        rows = peer_rows(args, tmp)
        print(peer_table(rows, args), flush=True)
        print(json.dumps({"loader_peer": rows}), flush=True)
        if args.peer_only:
            return
        records = mnist5k_records()[0][: args.images]
        shards = write_shards(records, f"{tmp}/shards", "bench", (len(records) + 1) // 2)
        stores = {}
        for name in (args.light, args.heavy):
            stores[name] = f"{tmp}/{name}.zarr"
            teacher = TeacherConfig(name, "none", input_size=args.input_size)
            extract(shards, stores[name], ExtractConfig(teacher=teacher, views=ViewConfig(count=2), dask_workers=0),
                    progress=False)
        for name in devices:
            result = bench_device(args, resolve_device(RuntimeConfig(device=name)), stores, shards)
            print(table(result), flush=True)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
