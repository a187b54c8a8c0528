"""Accuracy against cached views per image: students trained from stores of 2, 4, 8 and 16 augmented, mixed views.

    python benchmarks/views.py [--params params.yaml] [--views 2 4 8 16] [--epochs 16] [--methods kd gendd]
        [--train-shards 2] [--randaugment rand-n2-m7-mstd0.5] [--mixup 0.2] [--cutmix 1.0] [--smoothing 0.1]
        [--out data/views]

Uses the recipe's teacher and shards as `dvc repro` left them (run it first). One
store of the largest view count is extracted with RandAugment, mixup and cutmix
(the BEiT-L -> ResNet-50 recipe's settings by default) from the first
``--train-shards`` train shards; every view is drawn from (seed, key, view) alone,
so its first V views are the store a V-view extraction writes (tested in
tests/test_augment.py), and each student trains from them through
``loader.views = V``. Every student is the recipe's run of its method over
``distill.common`` (model, input size, learning rate, seed, GenDD's head and
stage-1 warmup) trained for the same ``--epochs`` with label smoothing; only V
differs. View 0 is the eval view, so a V-view store trains on
V - 1 views, each seen about epochs / (V - 1) times. Prints a markdown table of
val top-1 against V and one JSON line; accuracy does not depend on the machine's
load, and a run's seconds are printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gendd_pipe import extract as extraction  # noqa: E402
from gendd_pipe.distill import stage  # noqa: E402
from gendd_pipe.recipe import load_params, section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["kd", "gendd"])
    parser.add_argument("--train-shards", type=int, default=2, help="how many of the recipe's train shards")
    parser.add_argument("--randaugment", default="rand-n2-m7-mstd0.5")
    parser.add_argument("--mixup", type=float, default=0.2)
    parser.add_argument("--cutmix", type=float, default=1.0)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--out", default="data/views")
    args = parser.parse_args()
    params = load_params(args.params)
    train = sorted(u for p in params["distill"]["shards"] for u in glob.glob(p))[: args.train_shards]
    if not train:
        raise SystemExit(f"{args.params}: no train shards at {params['distill']['shards']}; run `dvc repro` first")

    store = os.path.join(args.out, "store.zarr")
    wanted = copy.deepcopy(params["extract"])
    wanted.update(shards=train, out=store, metrics=os.path.join(args.out, "extract.json"),
                  augment={"randaugment": args.randaugment, "mixup": args.mixup, "cutmix": args.cutmix})
    wanted["views"]["count"] = max(args.views)
    extraction.run_stage(section({"extract": wanted}, "extract", args.params))  # resumes a store left midway
    with open(wanted["metrics"]) as f:
        extracted = json.load(f)

    distill = copy.deepcopy(params["distill"])
    distill.update(store=store, shards=train, out=os.path.join(args.out, "distill"), runs={})
    distill["common"].update(epochs=args.epochs, warmup_epochs=min(distill["common"].get("warmup_epochs", 0), 1))
    distill["common"].setdefault("loader", {})["label_smoothing"] = args.smoothing
    recipe_runs = params["distill"]["runs"]
    for method in args.methods:  # the recipe's run of the method (its head, stage-1 epochs ...), over E epochs
        own = next((dict(r or {}) for n, r in recipe_runs.items() if (r or {}).get("method", n) == method), {})
        stage1 = own.get("gendd", {}).get("stage1_epochs", 0)  # GenDD's stage-1 warmup comes before the E epochs
        for views in args.views:
            distill["runs"][f"{method}-v{views}"] = copy.deepcopy(
                {**own, "method": method, "epochs": args.epochs + stage1,
                 "loader": {**own.get("loader", {}), "views": views}})
    runs = section({"distill": distill}, "distill", args.params)
    rows = []
    for name in runs.runs:
        start = time.perf_counter()
        summary = stage.run_stage(runs, name, progress=False)  # resumes a run killed midway
        method, views = name.rsplit("-v", 1)
        rows.append({"method": method, "views": int(views), "top1": summary["last"]["student"]["top1"],
                     "best_top1": summary["best"]["student"]["top1"], "seconds": time.perf_counter() - start})
        print(f"{name}: val top-1 {rows[-1]['top1']:.2f} (best {rows[-1]['best_top1']:.2f})", flush=True)

    images = extracted["samples"]
    print(f"\n{images} train images, {args.epochs} epochs, {args.randaugment}, mixup {args.mixup}, cutmix "
          f"{args.cutmix}, smoothing {args.smoothing}; {extracted['bytes_per_view']:.0f} bytes per view\n")
    heads = " | ".join(f"{m} student top-1 (%)" for m in args.methods)  # the student's own classifier
    print(f"| views V | training views | uses per view | {heads} |")
    print("|---|---|---|" + "---|" * len(args.methods))
    for views in args.views:
        cells = [next(f"{r['top1']:.2f}" for r in rows if r["method"] == m and r["views"] == views)
                 for m in args.methods]
        print(f"| {views} | {views - 1} | {args.epochs / (views - 1):.1f} | " + " | ".join(cells) + " |")
    print(json.dumps({"images": images, "epochs": args.epochs, "bytes_per_view": extracted["bytes_per_view"],
                      "runs": rows}))


if __name__ == "__main__":
    main()
