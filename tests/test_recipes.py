"""Every recipe under pipelines/ runs: one short pass of each of its stages on a handful of real digits.

The recipe's own settings are kept (models, input sizes, head size, sampling steps,
views, logits); only what scales with the data is cut down (epochs, batch size,
workers, view count), weights become ``none`` (random init, no download), and the
data paths point at a tiny ImageFolder of MNIST digits written on the fly.
"""

from __future__ import annotations

import glob
import os

import pytest
import yaml
from PIL import Image

from stages import distill, evaluate, extract, prepare, probes, report, teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "pipelines", "*", "params.yaml")))
SHARD_KEYS = ("shards", "val_shards", "train_shards")


def test_the_recipes_are_all_there():
    names = {os.path.basename(os.path.dirname(p)) for p in RECIPES}
    assert {"mnist5k", "mnist5k-unsupervised", "imagenet-r34-r18", "imagenet-r50-mobilenet",
            "cc3m-unsupervised-r34-r18", "cifar100-r50-r18"} <= names


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, mnist_records):
    """An ImageFolder tree of 24 real digits, 6 classes x 4 (more classes than gdkd's top-k of 5)."""
    root = tmp_path_factory.mktemp("folder")
    for label in range(6):
        os.makedirs(root / str(label))
        for i, record in enumerate([r for r in mnist_records[::25] if r.label == label][:4]):
            (root / str(label) / f"{i}.png").write_bytes(record.load())
    return str(root)


def _localize(params: dict, tmp: str, folder: str) -> dict:
    """Recipe params with data paths under ``tmp``, tiny shards and the cuts described above."""

    def walk(node, key=""):
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if key in SHARD_KEYS:
            split = "train" if key in ("shards", "train_shards") else "val"
            return [os.path.join(tmp, "shards", f"{split}-*.tar")]
        if isinstance(node, str) and node.startswith("data/"):
            return os.path.join(tmp, node)
        return node

    params = walk(params)
    params["extract"]["shards"] = [os.path.join(tmp, "shards", f"{split}-*.tar") for split in ("train", "val")]
    params["prepare"] = {"dataset": folder, "out": os.path.join(tmp, "shards"), "val_fraction": 0.25,
                         "shard_size": 8, "seed": 0}
    if "teacher" in params:
        params["teacher"].update(epochs=min(params["teacher"].get("epochs", 2), 1), batch_size=4)
        params["teacher"]["teacher"]["weights"] = "none"
    if not params["extract"]["teacher"]["weights"].endswith(".safetensors"):
        params["extract"]["teacher"]["weights"] = "none"
    params["extract"].update(batch_size=8, dask_workers=0)
    params["extract"]["views"]["count"] = min(params["extract"]["views"].get("count", 4), 2)
    for run in params["distill"]["runs"].values():
        gendd = run.get("gendd", {})
        run["epochs"] = 2 if gendd.get("stage1_epochs") else 1
        if gendd.get("stage1_epochs"):
            gendd["stage1_epochs"] = 1
    params["distill"]["common"].update(warmup_epochs=0, loader={"batch_size": 4, "num_workers": 0})
    params["evaluate"]["batch_size"] = 8
    return params


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_a_recipe_runs_each_stage(recipe, tmp_path, digit_folder):
    with open(recipe) as f:
        params = _localize(yaml.safe_load(f), str(tmp_path), digit_folder)
    prepare.run(params["prepare"])
    if "teacher" in params:
        shipped = teacher.run(params["teacher"])
        assert os.path.exists(shipped["model"])
    extract.run(params["extract"])
    if "probes" in params:
        refs = probes.run(params["probes"])
        assert set(refs) == {"teacher features", "random-init student"}
    runs = list(params["distill"]["runs"])
    for name in runs:
        summary = distill.run(params["distill"], name)
        assert summary["last"]["epoch"] == params["distill"]["runs"][name]["epochs"]
        result = evaluate.run(params["evaluate"], name)
        assert result["images"] == 6
    table = report.run(params["report"], runs)
    assert all(f"| {name} |" in table for name in runs)
    out = params["report"]["out"]
    assert {"results.md", "results.json", "accuracy.png", "comparison.png"} <= set(os.listdir(out))
    assert Image.open(os.path.join(out, "accuracy.png")).size[0] > 100
