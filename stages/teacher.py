"""Stage `teacher`: fine-tune the teacher on the train shards (model.safetensors + its val accuracy)."""

from __future__ import annotations

from gendd_pipe.config import build
from gendd_pipe.finetune import FinetuneConfig, finetune
from stages.params import load_section, stage_args


def run(section: dict) -> dict:
    """``section``: shards, val_shards, out (directory) and the FinetuneConfig fields."""
    io_keys = ("shards", "val_shards", "out")
    cfg = build(FinetuneConfig, {k: v for k, v in section.items() if k not in io_keys}, "teacher")
    return finetune(section["shards"], section["val_shards"], section["out"], cfg, resume=True, progress=False)


if __name__ == "__main__":
    run(load_section("teacher", stage_args("teacher").params))
