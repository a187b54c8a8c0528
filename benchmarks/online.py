"""The price of a fixed set of cached views: students distilled from V cached views per image against the teacher
run live on a fresh view every epoch, on Fashion-MNIST.

    python benchmarks/online.py [--params pipelines/fashion-mnist/params.yaml] [--train-shards 2] [--val-shards 1]
        [--epochs 10] [--views 1 2 4 8 16] [--seeds 0 1] [--methods kd gendd] [--growth-shards 1]
        [--out data/fashion/online]

Uses the recipe's fine-tuned teacher as `dvc repro pipelines/fashion-mnist/dvc.yaml:teacher` leaves it (run it
first) and the first ``--train-shards`` train shards (1,000 images each, in the shuffled order prepare wrote).
V counts training views: a V-view student trains on views 1..V of each image (view 0, the eval view, is stored
too and left out of training, as the official student never sees the center crop), so its store holds V + 1.
One store is extracted at 2 views, then grown by views (``extract --views``) to each V + 1 in turn: the growth
draws exactly the views an extraction of that count draws (tests/test_grow.py), so after each step the store
is the (V + 1)-view store, its wall time (cumulative) and bytes measured as it stands. Each student is the recipe's run of
its method over ``distill.common`` (student, input size, learning rate), trained for ``--epochs`` epochs
(GenDD: its stage-1 warmup first, shared between its cached runs) with ``loader.views = V + 1``; the online
student is the same run naming the recipe's live teacher (``teacher``, views drawn fresh: view 1 + e in epoch e,
so E epochs see E views of each image, each once). Last, a store of the best V (the fewest views within the online
seed range for every method) over the first ``--growth-shards`` train shards is grown by half again, and the KD
student of seed 0 trained from it is compared with the one trained from a fresh extraction of that count.

Prints a markdown table, a one-line JSON record and the answer; writes ``OUT/online.json`` and the plot
``OUT/online.png`` (val top-1 against V, the online runs as a band). Top-1 does not depend on the machine's load;
seconds do (they are measured one run at a time on this machine).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from gendd_pipe import extract as extraction  # noqa: E402
from gendd_pipe.distill import stage  # noqa: E402
from gendd_pipe.distill.checkpoint import read_checkpoint  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig, create_teacher  # noqa: E402
from gendd_pipe.recipe import load_params, section  # noqa: E402
from gendd_pipe.store.reader import FeatureStore  # noqa: E402

BEIT_L = {"teacher": "BEiT-L at 224 px", "teacher_gflops": 119.3, "student": "ResNet-50 at 224 px",
          "student_gflops": 24.3, "images": 1_281_167, "epochs": 620, "views": 64}
# The BEiT-L -> ResNet-50 recipe's figures (docs/recipes.md, "What the cache saves": torch's flop counter on
# the two timm models; a training step is a forward and a backward), for the projection in docs/results.md.


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def teacher_flops(weights: str, name: str, size: int) -> float:
    """FLOPs of one forward of the teacher at its input size (torch's flop counter)."""
    teacher = create_teacher(TeacherConfig(name, weights, input_size=size))
    with FlopCounterMode(display=False) as counter:
        teacher.forward(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    return float(counter.get_total_flops())


def extract_views(params: dict, where: str, train: list[str], out: str, counts: list[int]) -> list[dict]:
    """One store of the recipe's extraction settings over ``train``, grown to each of ``counts`` views in turn:
    the wall time of each growth and the store's bytes after it."""
    rows, spent = [], 0.0
    for count in counts:
        wanted = copy.deepcopy(params["extract"])
        wanted.update(shards=train, out=out, metrics=None)
        wanted["views"]["count"] = count
        start = time.perf_counter()
        extraction.run_stage(section({"extract": wanted}, "extract", where), progress=False)
        spent += time.perf_counter() - start
        rows.append({"views": count, "seconds": spent, "bytes": disk_bytes(out)})
        print(f"store of {count} views: {spent:.0f} s of extraction so far, {rows[-1]['bytes'] / 2**20:.1f} MiB",
              flush=True)
    return rows


def run_all(params: dict, where: str, runs: dict, train: list[str], val: list[str], store: str, out: str) -> dict:
    """Train every run of ``runs`` (name -> run settings over the recipe's ``distill.common``); name -> its last
    val top-1 of the student's own classifier and its wall seconds."""
    distill = copy.deepcopy(params["distill"])
    distill.update(store=store, shards=train, val_shards=val, out=out, runs=runs)
    cfg = section({"distill": distill}, "distill", where)
    results = {}
    for name in runs:
        start = time.perf_counter()
        summary = stage.run_stage(cfg, name, progress=False)  # resumes a run killed midway
        results[name] = {"top1": summary["last"]["student"]["top1"], "seconds": time.perf_counter() - start}
        print(f"{name}: val top-1 {results[name]['top1']:.2f} ({results[name]['seconds']:.0f} s)", flush=True)
    return results


def recipe_run(params: dict, method: str) -> dict:
    """The recipe's own run of ``method`` (its head, its stage-1 epochs), without its epochs or live teacher."""
    own = next((dict(r or {}) for n, r in params["distill"]["runs"].items()
                if (r or {}).get("method", n) == method and not (r or {}).get("teacher")), {})
    own.pop("epochs", None)
    return {**own, "method": method}


def plot(path: str, rows: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        cached = [r for r in rows if r["method"] == method and r["views"] is not None]
        views = sorted({r["views"] for r in cached})
        means = [statistics.mean(r["top1"] for r in cached if r["views"] == v) for v in views]
        for v in views:
            tops = [r["top1"] for r in cached if r["views"] == v]
            ax.scatter([v] * len(tops), tops, color="tab:blue", s=12)
        ax.plot(views, means, color="tab:blue", marker="o", label="cached views (seed mean)")
        online = [r["top1"] for r in rows if r["method"] == method and r["views"] is None]
        ax.axhspan(min(online), max(online), color="tab:orange", alpha=0.3, label="online (seed range)")
        ax.axhline(statistics.mean(online), color="tab:orange")
        ax.set_xscale("log", base=2)
        ax.set_xticks(views, [str(v) for v in views])
        ax.set_xlabel("cached training views per image (V)")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(method)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="pipelines/fashion-mnist/params.yaml")
    parser.add_argument("--train-shards", type=int, default=2, help="the first N train shards (1,000 images each)")
    parser.add_argument("--val-shards", type=int, default=1, help="the first N val shards (the test split)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="training views V")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["kd", "gendd"])
    parser.add_argument("--growth-shards", type=int, default=1, help="train shards of the growth check")
    parser.add_argument("--out", default="data/fashion/online")
    args = parser.parse_args()
    params = load_params(args.params)
    shards = sorted(u for p in params["distill"]["shards"] for u in glob.glob(p))[: args.train_shards]
    val = sorted(u for p in params["distill"]["val_shards"] for u in glob.glob(p))[: args.val_shards]
    teacher = params["extract"]["teacher"]
    if not shards or not os.path.exists(teacher["weights"]):
        raise SystemExit(f"{args.params}: no train shards or no teacher at {teacher['weights']}; run "
                         f"`dvc repro {os.path.dirname(args.params)}/dvc.yaml:teacher` first")
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "store.zarr")
    views = sorted(args.views)
    extracted = extract_views(params, args.params, shards, store, [v + 1 for v in views])
    images = FeatureStore.open(store).num_samples
    flops = teacher_flops(teacher["weights"], teacher["name"], teacher["input_size"])

    live = next(r["teacher"] for r in params["distill"]["runs"].values() if (r or {}).get("teacher"))
    runs = {}
    for method in args.methods:
        own = recipe_run(params, method)
        stage1 = own.get("gendd", {}).get("stage1_epochs", 0)  # GenDD's stage-1 warmup comes before the E epochs
        for seed in args.seeds:
            for v in views:
                runs[f"{method}-v{v}-s{seed}"] = {**own, "epochs": args.epochs + stage1, "seed": seed,
                                                  "loader": {**own.get("loader", {}), "views": v + 1}}
            runs[f"{method}-online-s{seed}"] = {**own, "epochs": args.epochs + stage1, "seed": seed, "teacher": live}
    results = run_all(params, args.params, runs, shards, val, store, os.path.join(args.out, "distill"))

    rows = []
    for name, result in results.items():
        method, kind, seed = name.split("-")
        v = None if kind == "online" else int(kind[1:])
        forwards = images * args.epochs if v is None else images * (v + 1)
        rows.append({"method": method, "views": v, "seed": int(seed[1:]), **result, "teacher_forwards": forwards,
                     "teacher_gflops": forwards * flops / 1e9})

    # the best V: the fewest views whose seed mean is within the online seed range of every method
    def mean(method, v):
        return statistics.mean(r["top1"] for r in rows if r["method"] == method and r["views"] == v)

    def within(method, v):
        band = [r["top1"] for r in rows if r["method"] == method and r["views"] is None]
        return mean(method, v) >= min(band)

    best = next((v for v in views if all(within(m, v) for m in args.methods)), views[-1])
    # the store of the best V (on the first --growth-shards train shards) grown by half again, against a fresh
    # extraction of that count: the same arrays, so the same KD student
    first = shards[: args.growth_shards]
    count, grown_views = best + 1, best + 1 + (best + 2) // 2
    stores = {kind: os.path.join(args.out, f"{kind}.zarr") for kind in ("grown", "fresh")}
    for path in stores.values():
        shutil.rmtree(path, ignore_errors=True)
    grown = extract_views(params, args.params, first, stores["grown"], [count, grown_views])
    fresh = extract_views(params, args.params, first, stores["fresh"], [grown_views])[0]
    check = {"kd-grown": {**recipe_run(params, "kd"), "epochs": args.epochs, "seed": 0,
                          "loader": {"views": grown_views}}}
    students = {kind: run_all(params, args.params, check, first, val, path, os.path.join(args.out, kind))["kd-grown"]
                for kind, path in stores.items()}
    a, b = (read_checkpoint(os.path.join(args.out, kind, "runs", "kd-grown", "last.safetensors"))["state_dict"]
            for kind in stores)
    growth = {"views": grown_views, "from": count, "images": FeatureStore.open(stores["fresh"]).num_samples,
              "grown_top1": students["grown"]["top1"], "fresh_top1": students["fresh"]["top1"],
              "weights_equal": all(torch.equal(a[k], b[k]) for k in a),
              "grow_seconds": grown[1]["seconds"] - grown[0]["seconds"], "fresh_seconds": fresh["seconds"]}

    by_count = {e["views"]: e for e in extracted}
    table = ["| student | training views V | store | extraction | teacher forwards | teacher TFLOPs | "
             "training (mean) | val top-1 (seeds) | mean |", "|---|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        for v in [*views, None]:
            mine = [r for r in rows if r["method"] == method and r["views"] == v]
            e = by_count.get(v + 1) if v is not None else None
            store_cell = f"{e['bytes'] / 2**20:.1f} MiB" if e else "none"
            extract_cell = f"{e['seconds']:.0f} s" if e else "none"
            table.append(f"| {method} | {v if v is not None else 'online'} | {store_cell} | {extract_cell} | "
                         f"{mine[0]['teacher_forwards']:,} | {mine[0]['teacher_gflops'] / 1e3:.1f} | "
                         f"{statistics.mean(r['seconds'] for r in mine):.0f} s | "
                         f"{' / '.join(format(r['top1'], '.2f') for r in mine)} | "
                         f"{statistics.mean(r['top1'] for r in mine):.2f} |")
    print(f"\n{images} train images ({len(shards)} shards), {len(val)} val shards, {args.epochs} epochs, seeds "
          f"{args.seeds}; teacher {teacher['name']} at {teacher['input_size']} px, {flops / 1e6:.1f} MFLOPs a "
          "forward\n")
    print("\n".join(table))
    print(f"\n{growth['images']} images grown {growth['from']} -> {growth['views']} views in "
          f"{growth['grow_seconds']:.0f} s (a fresh "
          f"extraction of {growth['views']}: {growth['fresh_seconds']:.0f} s); kd from the grown store "
          f"{growth['grown_top1']:.2f}, from the fresh one {growth['fresh_top1']:.2f}, weights equal: "
          f"{growth['weights_equal']}")
    record = {"images": images, "epochs": args.epochs, "seeds": args.seeds, "teacher_flops": flops,
              "extraction": extracted, "runs": rows, "best_views": best, "growth": growth, "beit_l": BEIT_L}
    with open(os.path.join(args.out, "online.json"), "w") as f:
        json.dump(record, f, indent=2)
    plot(os.path.join(args.out, "online.png"), rows, args.methods)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
