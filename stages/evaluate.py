"""Stage `evaluate`: score a trained student on the val shards (own head, GenDD samples, linear probe)."""

from __future__ import annotations

from gendd_pipe.distill.evaluate import evaluate_checkpoint
from stages.params import load_section, write_json


def run(section: dict) -> dict:
    """``section``: checkpoint, val_shards, out (json path); optional train_shards (probe), batch_size,
    samples and sampling (steps, cfg, temperature, sampler)."""
    result = evaluate_checkpoint(section["checkpoint"], section["val_shards"], section.get("train_shards"),
                                 section.get("batch_size", 128), section.get("samples", 1), section.get("sampling"))
    write_json(section["out"], result)
    return result


if __name__ == "__main__":
    run(load_section("evaluate"))
