"""Stage `evaluate@RUN`: score a trained student on the val shards (own head, GenDD samples, linear probe)."""

from __future__ import annotations

import os

from gendd_pipe.distill.evaluate import evaluate_checkpoint
from stages.params import load_section, stage_args, write_json


def run(section: dict, name: str) -> dict:
    """``section``: runs (the distill runs directory), val_shards, out (directory of NAME.json); optional
    train_shards (fit a linear probe on them), batch_size, samples and sampling (steps, cfg, temperature,
    sampler)."""
    checkpoint = os.path.join(section["runs"], name, "last.pt")
    result = evaluate_checkpoint(checkpoint, section["val_shards"], section.get("train_shards"),
                                 section.get("batch_size", 128), section.get("samples", 1), section.get("sampling"))
    write_json(os.path.join(section["out"], f"{name}.json"), {"run": name, **result})
    return result


if __name__ == "__main__":
    args = stage_args("evaluate", with_run=True)
    run(load_section("evaluate", args.params), args.run)
