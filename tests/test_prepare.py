import hashlib
import json
import os

import numpy as np
from PIL import Image

from gendd_pipe.data.prepare import PrepareConfig, folder_records, prepare, stratified_split
from gendd_pipe.data.shards import Sample, ShardReader


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_mnist5k_shards_are_stratified_and_reproducible(tmp_path, mnist_records):
    classes = [str(d) for d in range(10)]
    cfg = PrepareConfig(val_fraction=0.2, shard_size=1500, seed=1)
    a = prepare(mnist_records, classes, str(tmp_path / "a"), cfg, "mnist5k")
    assert a["train"] == {"samples": 4000, "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]}
    assert a["val"]["samples"] == 1000
    val = [s for s in ShardReader(str(tmp_path / "a" / "val-000000.tar"))]
    assert len(val) == 1000 and all(isinstance(s, Sample) for s in val)
    assert np.bincount([s.label for s in val]).tolist() == [100] * 10
    assert val[0].image.size == (28, 28)
    train_keys = {s.key for p in a["train"]["shards"] for s in ShardReader(str(tmp_path / "a" / p))}
    assert len(train_keys) == 4000 and not train_keys & {s.key for s in val}
    prepare(mnist_records, classes, str(tmp_path / "b"), cfg, "mnist5k")
    for shard in a["train"]["shards"] + a["val"]["shards"]:
        assert _md5(tmp_path / "a" / shard) == _md5(tmp_path / "b" / shard)
    assert json.load(open(tmp_path / "a" / "prepare.json"))["classes"] == classes


def test_stratified_split_keeps_every_class_share():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    train, val = stratified_split(labels, 0.5, seed=0)
    assert np.bincount(labels[val]).tolist() == [5, 10, 15]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(60))


def test_folder_prepare_reads_an_imagefolder_tree(tmp_path, photos):
    src = tmp_path / "src"
    for name, image in photos.items():
        cls = "cats" if name == "chelsea" else "other"
        os.makedirs(src / cls, exist_ok=True)
        for i in range(3):
            Image.fromarray(image).save(src / cls / f"{name}.{i}.png")
    (src / "other" / "notes.txt").write_text("not an image")
    records, classes = folder_records(str(src))
    assert classes == ["cats", "other"] and len(records) == 12
    summary = prepare(records, classes, str(tmp_path / "out"), PrepareConfig(val_fraction=1 / 3, shard_size=100), str(src))
    assert summary["train"]["samples"] == 8 and summary["val"]["samples"] == 4
    samples = list(ShardReader(str(tmp_path / "out" / "train-000000.tar")))
    assert {s.label for s in samples} == {0, 1}
    assert all("." not in s.key for s in samples)
