"""Stage `distill`: train a student from the feature store (one run directory per method)."""

from __future__ import annotations

from gendd_pipe.config import build
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.train import distill
from stages.params import load_section, write_json


def run(section: dict) -> dict:
    """``section``: store, shards, val_shards, out (run dir), metrics (json path) and the DistillConfig fields."""
    io_keys = ("store", "shards", "val_shards", "out", "metrics")
    cfg = build(DistillConfig, {k: v for k, v in section.items() if k not in io_keys}, "distill")
    summary = distill(section["store"], section["shards"], section["val_shards"], section["out"], cfg,
                      resume=True, progress=False)
    write_json(section["metrics"], {"config": cfg, **summary})
    return summary


if __name__ == "__main__":
    run(load_section("distill"))
