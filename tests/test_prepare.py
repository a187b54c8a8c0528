import hashlib
import json
import os

import numpy as np
import pytest
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


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """An IDX file of unsigned bytes, as Fashion-MNIST's release has them."""
    import gzip

    data = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()
    if gz:
        with open(str(path) + ".gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        open(path, "wb").write(data)


def fashion_idx(directory, train: int = 30, test: int = 10, gz: bool = True):
    """Tiny Fashion-MNIST IDX files: clothing-like grey squares, every class in each split."""
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.random((n, 28, 28)) * 40 + labels[:, None, None] * 20).astype(np.uint8)
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), labels, gz)
    return directory


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_keeps_its_own_test_split_as_val(tmp_path, gz):
    from gendd_pipe.data.prepare import PrepareStage, run_stage

    src = fashion_idx(str(tmp_path / "idx"), gz=gz)
    cfg = PrepareStage(dataset="fashion-mnist", data_dir=src, out=str(tmp_path / "out"), shard_size=16)
    summary = run_stage(cfg)
    assert summary["train"] == {"samples": 30, "shards": ["train-000000.tar", "train-000001.tar"]}
    assert summary["val"] == {"samples": 10, "shards": ["val-000000.tar"]}
    assert summary["classes"][0] == "T-shirt/top" and len(summary["classes"]) == 10
    train = [s for p in summary["train"]["shards"] for s in ShardReader(str(tmp_path / "out" / p))]
    val = list(ShardReader(str(tmp_path / "out" / "val-000000.tar")))
    assert {s.key for s in val} == {f"fashion-test-{i:05d}" for i in range(10)}
    assert sorted(s.key for s in train) == [f"fashion-train-{i:05d}" for i in range(30)]
    assert [s.key for s in train] != sorted(s.key for s in train)  # shuffled from the seed
    first = next(s for s in train if s.key == "fashion-train-00003")
    assert first.label == 3 and first.image.size == (28, 28)
    pixels = np.asarray(first.rgb())[..., 0]
    images = read_idx_back(src, gz)
    assert np.array_equal(pixels, images[3])
    again = run_stage(PrepareStage(dataset="fashion-mnist", data_dir=src, out=str(tmp_path / "again"),
                                   shard_size=16))
    for shard in summary["train"]["shards"] + summary["val"]["shards"]:
        assert _md5(tmp_path / "out" / shard) == _md5(tmp_path / "again" / shard)
    assert again == {**summary, "source": "fashion-mnist"}


def read_idx_back(directory, gz):
    from gendd_pipe.data.prepare import read_idx

    return read_idx(os.path.join(directory, "train-images-idx3-ubyte" + (".gz" if gz else "")), 3)


def test_fashion_mnist_absent_or_broken_is_one_line(tmp_path):
    from tests.test_cli import _invoke, _one_line_error

    out = ["--out", tmp_path / "out"]
    _one_line_error(_invoke("prepare", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "none", *out),
                    "fashion-mnist: no train-images-idx3-ubyte[.gz] in", "dataset-fashion-mnist", "--data-dir")
    src = fashion_idx(str(tmp_path / "idx"), gz=False)
    with open(os.path.join(src, "train-images-idx3-ubyte"), "r+b") as f:
        f.truncate(500)
    _one_line_error(_invoke("prepare", "--dataset", "fashion-mnist", "--data-dir", src, *out),
                    "train-images-idx3-ubyte: holds", "truncated")
    src = fashion_idx(str(tmp_path / "idx2"), gz=False)
    write_idx(os.path.join(src, "train-labels-idx1-ubyte"), np.zeros((2, 2), np.uint8), gz=False)
    _one_line_error(_invoke("prepare", "--dataset", "fashion-mnist", "--data-dir", src, *out),
                    "train-labels-idx1-ubyte: not an IDX file")
    assert not os.path.exists(tmp_path / "out")
