"""The GPU check: what only a GPU shows, in one call of under 8 minutes on a one-GPU machine.

    python benchmarks/gpu_check.py [--out DIR] [--parts NAME ...] [--device cpu]

Each part runs, is timed and gives one row of the GPU table in docs/performance.md:

- ``cuda-tests``: ``pytest -m cuda`` (the tests that need a GPU).
- ``suite``: the suite's fast tests (``-m "not slow and not cuda"``) on this machine; they run on the CPU
  by design, so a GPU machine passes the whole suite.
- ``extract``: a real-size teacher (resnet50, weights none) extracts MNIST digits at 224 px in fp32 and under
  bf16 autocast; the feature cosine between the two and the images/s of each.
- ``distill-bench``: ``benchmarks/distill.py`` on the GPU at a reduced size (cache speedup, loader headroom,
  GenDD cost).
- ``torchrun``: one GPU rank under ``torchrun --standalone``: extract a small store, distill 2 epochs of KD, and
  resume; the rank's device and the checkpoint's world size.

Without a GPU (``--device cpu``, or no CUDA device) the parts that need one are skipped and the others run on the
CPU at a small size, so the script cannot rot (``tests/test_benchmarks.py`` runs it). The table is printed last,
with the machine and the date; ``--out`` keeps each part's log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the source tree, as on a machine where the package is not installed

from gendd_pipe.data.prepare import mnist5k_records, write_shards  # noqa: E402
from gendd_pipe.data.views import ViewConfig  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig  # noqa: E402
from gendd_pipe.runtime import RuntimeConfig  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402

PARTS = ("cuda-tests", "suite", "extract", "distill-bench", "torchrun")
GPU_ONLY = ("cuda-tests", "suite", "distill-bench")  # on the CPU these are the suite's own business


def _run(cmd: list[str], log: str, timeout: int, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` from the project root, its output kept in ``log``; (exit code, last line)."""
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = 124
    lines = [line.strip() for line in open(log) if line.strip()]
    return code, (lines[-1] if lines else "")


def _features(store: str) -> np.ndarray:
    store = FeatureStore.open(store)
    return np.concatenate([store.read_shard(n)["features"].astype(np.float32) for n in store.shard_names])


def part_extract(device: str, shards: list[str], images: int, tmp: str) -> str:
    """fp32 against bf16 extraction: the feature cosine (min / mean over every view) and images/s of each."""
    gpu = device != "cpu"
    teacher = TeacherConfig("resnet50" if gpu else "resnet18", "none", input_size=224 if gpu else 64)
    rates, stores = {}, {}
    for amp in ("off", "bf16"):
        stores[amp] = f"{tmp}/extract-{amp}.zarr"
        cfg = ExtractConfig(teacher=teacher, views=ViewConfig(count=2), dask_workers=0, batch_size=64,
                            runtime=RuntimeConfig(device=device, amp=amp))
        start = time.perf_counter()
        extract(shards, stores[amp], cfg, progress=False)
        rates[amp] = images / (time.perf_counter() - start)
    a, b = _features(stores["off"]), _features(stores["bf16"])
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ok = cosine.min() >= 0.99
    return (f"{'ok' if ok else 'FAILED'}: {teacher.name} at {teacher.input_size} px, bf16 vs fp32 feature cosine "
            f"min {cosine.min():.4f} mean {cosine.mean():.5f}; {rates['off']:.0f} / {rates['bf16']:.0f} images/s "
            "(fp32 / bf16, extraction end to end)")


def part_torchrun(device: str, shards: list[str], tmp: str, log: str) -> str:
    """One rank under torchrun: a small store, 2 epochs of KD killed after 1 (run to 1, then resumed to 2)."""
    store = f"{tmp}/small.zarr"
    extract(shards, store, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                                         views=ViewConfig(count=3, scale=(0.5, 1.0)), dask_workers=0),
            progress=False)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    base = [*launcher, "--standalone", "--nproc-per-node", "1", "-m", "gendd_pipe.cli", "distill", "--store", store,
            "--out", f"{tmp}/distill", "--student", "resnet10t", "--input-size", "32", "--method", "kd",
            "--batch-size", "32", "--warmup-epochs", "0", "--device", "auto" if device != "cpu" else "cpu", "-q",
            "--val-shards", shards[-1], *[arg for s in shards[:-1] for arg in ("--shards", s)]]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    for epochs, extra in ((1, []), (2, ["--resume"])):
        code, last = _run(base + ["--epochs", str(epochs), *extra], log, 300, env)
        if code:
            return f"FAILED (exit {code}): {last}"
    from gendd_pipe.distill.checkpoint import read_checkpoint

    ckpt = read_checkpoint(f"{tmp}/distill/runs/kd/last.safetensors")
    lines = [json.loads(line) for line in open(f"{tmp}/distill/runs/kd/metrics.jsonl")]
    ok = [m["epoch"] for m in lines] == [1, 2] and ckpt["distributed"]["world_size"] == 1
    return (f"{'ok' if ok else 'FAILED'}: 2 epochs of kd (1, then resumed), val top-1 "
            f"{lines[-1]['val']['student']['top1']:.1f}, {lines[-1]['images_per_s']:.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="a directory for each part's log (default: a temporary one)")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default where there is one) or cpu: the CPU parts alone, small")
    parser.add_argument("--images", type=int, default=256, help="MNIST digits of the extraction and torchrun parts")
    args = parser.parse_args()
    gpu = args.device != "cpu"
    machine = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        records = mnist5k_records()[0][: args.images]
        shards = write_shards(records, f"{tmp}/shards", "digits", (len(records) + 3) // 4)
        for part in args.parts:
            if part in GPU_ONLY and not gpu:
                rows.append((part, "skipped: needs a GPU", 0.0))
                continue
            log, start = os.path.join(out, f"{part}.log"), time.perf_counter()
            try:
                if part == "cuda-tests":
                    code, last = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                                      log, 300)
                    result = f"{'ok' if code == 0 else f'FAILED (exit {code})'}: {last}"
                elif part == "suite":
                    code, last = _run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow and not cuda",
                                       "-p", "no:cacheprovider"], log, 420)
                    result = f"{'ok' if code == 0 else f'FAILED (exit {code})'}: {last}"
                elif part == "extract":
                    result = part_extract(args.device, shards, len(records), tmp)
                elif part == "distill-bench":
                    code, last = _run([sys.executable, "benchmarks/distill.py", "--devices", "cuda", "--images", "96",
                                       "--steps", "2", "--repeats", "1", "--peer-images", "96"], log, 300)
                    result = f"{'ok' if code == 0 else f'FAILED (exit {code})'}: see {part}.log ({last[:120]})"
                else:
                    result = part_torchrun(args.device, shards, tmp, log)
            except Exception as exc:  # noqa: BLE001 - one part's failure is its row; the others still run
                result = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append((part, result, time.perf_counter() - start))
            print(f"{part}: {result} ({rows[-1][2]:.0f} s)", flush=True)
    today = datetime.date.today().isoformat()
    print("\n| date | machine | check | result | seconds |\n|---|---|---|---|---:|")
    for part, result, seconds in rows:
        print(f"| {today} | {machine} | {part} | {result} | {seconds:.0f} |")
    sys.exit(1 if any(r[1].startswith("FAILED") for r in rows) else 0)


if __name__ == "__main__":
    main()
