"""Reading WebDataset tar shards: URLs, names, and samples with their labels.

Two layouts are read as they are: ImageNet-style (``KEY.jpg|png`` + ``KEY.cls``)
and img2dataset/CC3M-style (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, no label;
such samples get label -1). Shards are addressed by local paths, brace patterns
(``train-{000000..000009}.tar``) or fsspec URLs. The tar is streamed once with
webdataset's tar iterators while its sha256 is computed on the way.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import fsspec
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from gendd_pipe.errors import GenddError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
UNLABELED = -1


@dataclass
class Sample:
    """One decoded sample of a shard."""

    key: str
    image: Image.Image  # RGB
    label: int  # -1 where the shard has no label


@dataclass
class Skipped:
    """A sample (or the rest of a shard) that could not be read, and why."""

    key: str | None  # None when the tar itself broke
    reason: str


def expand_urls(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Brace-expand patterns, glob local paths, and return absolute local paths or URLs."""
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if "://" in url:
                urls.append(url)
                continue
            matches = sorted(glob.glob(url)) if glob.has_magic(url) else [url]
            if not matches:
                raise GenddError(f"{url}: no shard matches this pattern")
            urls.extend(os.path.abspath(m) for m in matches)
    if not urls:
        raise GenddError("no input shards given")
    return urls


def shard_name(url: str) -> str:
    """The feature-shard name of an input shard: its file name without ``.tar``."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".tar")] if base.endswith(".tar") else base


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte it hands out."""

    def __init__(self, raw):
        self.raw, self.sha256, self.nbytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.nbytes += len(data)
        return len(data)

    def drain(self) -> None:
        """Hash what the tar reader left unread: end-of-archive padding or a broken tail."""
        while self.readinto(bytearray(1 << 20)):
            pass


def decode_sample(sample: dict) -> Sample:
    """A grouped tar sample (``__key__`` plus extension -> bytes) to a decoded `Sample`.

    Raises:
        ValueError: the sample has no image, an unreadable image or a bad ``cls``.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image (found {', '.join(sorted(k for k in sample if not k.startswith('__')))})")
    try:
        image = Image.open(io.BytesIO(sample[ext]))
        image.load()
        image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable {ext} image ({exc})") from exc
    label = UNLABELED
    if "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError as exc:
            raise ValueError(f"cls is not an integer ({text[:20]!r})") from exc
    return Sample(str(sample["__key__"]), image, label)


class ShardReader:
    """Stream one shard's samples; once iterated, `sha256` and `nbytes` describe the source.

    Args:
        url: Local path or fsspec URL of a tar shard.
        on_error: ``fail`` raises `GenddError` at the first bad sample or broken tar;
            ``skip`` yields a `Skipped` record instead and goes on.
    """

    def __init__(self, url: str, on_error: str = "fail"):
        if on_error not in ("fail", "skip"):
            raise GenddError(f"on_error must be fail or skip, not {on_error!r}")
        self.url, self.on_error = url, on_error
        self.sha256: str | None = None
        self.nbytes = 0

    def __iter__(self) -> Iterator[Sample | Skipped]:
        try:
            handle = fsspec.open(self.url, "rb").open()
        except (OSError, ValueError) as exc:
            raise GenddError(f"{self.url}: cannot open shard ({exc})") from exc
        with handle:
            reader = _HashingReader(handle)
            yield from self._samples(io.BufferedReader(reader, buffer_size=1 << 20))
            reader.drain()
            self.sha256, self.nbytes = reader.sha256.hexdigest(), reader.nbytes

    def _samples(self, stream) -> Iterator[Sample | Skipped]:
        count = 0
        try:
            files = ({**f, "__url__": self.url} for f in tar_file_iterator(stream))
            for raw in group_by_keys(files):
                try:
                    sample = decode_sample(raw)
                except ValueError as exc:
                    yield self._skip(raw.get("__key__"), str(exc))
                    continue
                count += 1
                yield sample
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield self._skip(None, f"truncated or unreadable tar after {count} samples ({exc})")

    def _skip(self, key: str | None, reason: str) -> Skipped:
        if self.on_error == "fail":
            where = f"sample {key}: " if key is not None else ""
            raise GenddError(f"{self.url}: {where}{reason}")
        return Skipped(key, reason)
