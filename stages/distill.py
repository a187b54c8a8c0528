"""Stage `distill@RUN`: train one student from the feature store (one run directory per entry of distill.runs)."""

from __future__ import annotations

import csv
import json
import os

from gendd_pipe.config import build
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.train import METRICS, distill
from stages.params import load_section, run_config, stage_args, write_json


def write_curve(run_dir: str, path: str) -> None:
    """Val top-1 of every predictor per epoch, as a CSV for `dvc plots` and the report."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, METRICS)) if line.strip()]
    predictors = [k for k, v in lines[0]["val"].items() if isinstance(v, dict)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", *predictors])
        for m in lines:
            writer.writerow([m["epoch"], round(m["train"]["loss"], 5), *(m["val"][p]["top1"] for p in predictors)])


def run(section: dict, name: str, where: str = "params.yaml") -> dict:
    """``section``: store, shards, val_shards, out, common and runs (DistillConfig fields); ``name`` picks the
    run. Writes ``OUT/runs/NAME`` (checkpoints, metrics.jsonl), ``OUT/metrics/NAME.json`` and
    ``OUT/plots/NAME.csv``."""
    cfg = build(DistillConfig, run_config(section, name, where), f"distill.runs.{name}")
    root = section["out"]
    run_dir = os.path.join(root, "runs", name)
    summary = distill(section["store"], section["shards"], section["val_shards"], run_dir, cfg, resume=True,
                      progress=False)
    write_json(os.path.join(root, "metrics", f"{name}.json"),
               {"run": name, "method": cfg.method, "unsupervised": cfg.unsupervised, **summary})
    write_curve(run_dir, os.path.join(root, "plots", f"{name}.csv"))
    return summary


if __name__ == "__main__":
    args = stage_args("distill", with_run=True)
    run(load_section("distill", args.params), args.run, args.params)
