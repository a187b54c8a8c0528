"""Stage `prepare`: write the train/val image shards of the recipe's data set."""

from __future__ import annotations

from gendd_pipe.data.prepare import PrepareConfig, folder_records, mnist5k_records, prepare
from gendd_pipe.config import build
from stages.params import load_section, stage_args


def run(section: dict) -> dict:
    """``section``: dataset (mnist5k or an ImageFolder path), out, and the PrepareConfig fields."""
    dataset, out = section["dataset"], section["out"]
    cfg = build(PrepareConfig, {k: v for k, v in section.items() if k not in ("dataset", "out")}, "prepare")
    records, classes = mnist5k_records() if dataset == "mnist5k" else folder_records(dataset)
    return prepare(records, classes, out, cfg, dataset)  # also writes out/prepare.json


if __name__ == "__main__":
    run(load_section("prepare", stage_args("prepare").params))
