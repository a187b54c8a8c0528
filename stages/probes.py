"""Stage `probes`: the reference linear probes of an unsupervised recipe (teacher features, random student)."""

from __future__ import annotations

from gendd_pipe.config import build
from gendd_pipe.distill.evaluate import reference_probes
from gendd_pipe.models.student import StudentConfig
from stages.params import load_section, stage_args, write_json


def run(section: dict) -> dict:
    """``section``: store, shards (train), val_shards, student (StudentConfig fields), seed, out (json path)."""
    student = build(StudentConfig, section["student"], "probes.student")
    result = reference_probes(section["store"], section["shards"], section["val_shards"], student,
                              section.get("seed", 0), section.get("batch_size", 128))
    write_json(section["out"], result)
    return result


if __name__ == "__main__":
    run(load_section("probes", stage_args("probes").params))
