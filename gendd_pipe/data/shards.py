"""Reading WebDataset tar shards: URLs, names, and samples with their labels.

Two layouts are read as they are: ImageNet-style (``KEY.jpg|png`` + ``KEY.cls``)
and img2dataset/CC3M-style (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, no label;
such samples get label -1). Shards are addressed by local paths, brace patterns
(``train-{000000..000009}.tar``) or fsspec URLs. The tar is streamed once while
its sha256 is computed on the way; members are grouped into samples by
webdataset's rule (`base_plus_ext`: the key is the name up to the first dot of
its last part). Member names are only ever keys, never paths on this machine.

A bad sample (unreadable image, bad label, a member twice, a key seen before in
the shard) is one `Skipped` record naming its key. A tar that breaks off keeps
every sample read in full before the break, and its record names the byte
offset and the last good key. 16-bit images are scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import braceexpand
import fsspec
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.storage import explain, storage_errors

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
UNLABELED = -1
META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples


@dataclass
class Sample:
    """One sample of a shard: its image decoded to RGB, or (a reader with ``decode=False``) opened only, with
    its encoded bytes, for a renderer to decode when and where it renders."""

    key: str
    image: Image.Image  # RGB; opened but not decoded (any mode) when ``data`` is kept
    label: int  # -1 where the shard has no label
    data: bytes | None = None  # the encoded image, kept by a reader with decode=False ...
    ext: str | None = None  # ... and the extension of its member

    def rgb(self) -> Image.Image:
        """The image decoded to RGB.

        Raises:
            ValueError: the image cannot be decoded (see `to_rgb`).
        """
        if self.data is None:
            return self.image
        # decoded from the bytes each time, so a sample held for later (a mix partner) keeps no pixels in memory
        return _decoded(Image.open(io.BytesIO(self.data)), self.ext or "image")


@dataclass
class Skipped:
    """A sample (or the rest of a shard) that could not be read, and why."""

    key: str | None  # None when the tar itself broke
    reason: str
    offset: int | None = None  # where a broken tar broke: the byte offset of the first member not read in full
    after: str | None = None  # ... and the last key read in full before it

    def record(self) -> dict:
        """The manifest's entry (without the shard name)."""
        extra = {"offset": self.offset, "after": self.after} if self.offset is not None else {}
        return {"key": self.key, "reason": self.reason, **extra}


def expand_urls(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Brace-expand patterns, glob local paths and URLs alike through fsspec (``*`` ``?`` ``[...]``), and return
    absolute local paths or URLs."""
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            remote = "://" in url
            if glob.has_magic(url.split("://", 1)[-1]) and not url.startswith(("http://", "https://")):
                matches = _glob(url)  # (over HTTP a '?' starts the query string)
            else:
                matches = [url if remote else os.path.abspath(url)]
            if not matches:
                raise GenddError(f"{public_url(url)}: no shard matches this pattern")
            urls.extend(matches)
    if not urls:
        raise GenddError("no input shards given")
    return urls


def _glob(url: str) -> list[str]:
    """The paths or URLs a wildcard path or URL (``s3://bucket/train-*.tar``) matches, sorted."""
    with storage_errors(url, "list the shards"):
        fs, path = fsspec.core.url_to_fs(url)
        found = sorted(fs.glob(path))
        return [fs.unstrip_protocol(p) for p in found] if "://" in url else [os.path.abspath(p) for p in found]


def shard_name(url: str) -> str:
    """The feature-shard name of an input shard: its file name without ``.tar``."""
    path = urlsplit(url.rsplit("::", 1)[-1]).path if "://" in url else url  # no query string, no fragment
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".tar")] if base.endswith(".tar") else base


def shard_labels(urls: list[str]) -> tuple[dict[str, int], int, int]:
    """(sample count per shard URL, lowest label, highest label) of shards, read from their ``cls`` members
    without decoding images; a sample without one counts as label -1 (`UNLABELED`)."""
    counts, low, top = dict.fromkeys(urls, 0), None, UNLABELED
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        counts[sample["__url__"]] += 1
        label = UNLABELED
        if "cls" in sample:
            text = sample["cls"].decode("utf-8", "replace").strip()
            try:
                label = int(text)
            except ValueError:
                raise GenddError(f"{sample['__url__']}: sample {sample['__key__']!r} has cls {text[:20]!r}, "
                                 "not an integer") from None
        low, top = label if low is None else min(low, label), max(top, label)
    return counts, UNLABELED if low is None else low, top


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte it hands out."""

    def __init__(self, raw):
        self.raw, self.sha256, self.nbytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.raw.read(len(buffer))
        except OSError:
            raise
        except Exception as exc:  # a remote filesystem's own errors (HTTP status, connection) as I/O errors
            raise OSError(f"read failed: {exc}") from exc
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.nbytes += len(data)
        return len(data)

    def drain(self) -> None:
        """Hash what the tar reader left unread: end-of-archive padding or a broken tail."""
        while self.readinto(bytearray(1 << 20)):
            pass


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as timm's loaders see it, but with 16-bit and 32-bit integer images scaled to 8 bits, not clipped.

    Raises:
        ValueError: a float image (no defined 8-bit scale) or integers outside 0..65535.
    """
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit) and I (32-bit, how some 16-bit PNGs open)
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} image with values outside 0..65535")
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("32-bit float image: no defined 8-bit scale")
    return image.convert("RGB")


def _decoded(image: Image.Image, ext: str) -> Image.Image:
    try:
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable {ext} image ({exc})") from exc


def decode_sample(sample: dict, num_classes: int | None = None, decode: bool = True) -> Sample:
    """A grouped tar sample (``__key__`` plus extension -> bytes) to a `Sample`.

    Args:
        num_classes: When given, a label must lie in 0..num_classes-1 (or be -1, none).
        decode: Decode the image now; False only opens it (its header: format, mode, size) and keeps the bytes.

    Raises:
        ValueError: the sample has no image, an unreadable image (header, or all of it when decoding) or a bad
            ``cls``.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image (found {', '.join(sorted(k for k in sample if not k.startswith('__')))})")
    try:
        image = Image.open(io.BytesIO(sample[ext]))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable {ext} image ({exc})") from exc
    image = _decoded(image, ext) if decode else image
    label = UNLABELED
    if "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError as exc:
            raise ValueError(f"cls is not an integer ({text[:20]!r})") from exc
        if label < UNLABELED or (num_classes is not None and label >= num_classes):
            top = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
            raise ValueError(f"label {label} is outside the classes ({top}, or -1 for none)")
    return Sample(str(sample["__key__"]), image, label, *((None, None) if decode else (sample[ext], ext)))


class _Break(Exception):
    """The tar ended badly: at ``offset``, in member ``member`` (None: between members)."""

    def __init__(self, offset: int, member: str | None, reason: str):
        super().__init__(reason)
        self.offset, self.member = offset, member


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular member of a tar stream, in order.

    Raises:
        _Break: the tar is truncated or corrupt; what was yielded before is whole.
    """
    tar = info = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if info.isreg() and not META.match(info.name):
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # stream mode: keep no history
            info = None
        if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:  # tarfile ends quietly where a header is cut
            raise tarfile.ReadError("no end-of-archive block")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        offset = info.offset if info is not None else (tar.offset if tar is not None else 0)
        raise _Break(offset, info.name if info is not None else None, str(exc) or type(exc).__name__) from None


class ShardReader:
    """Stream one shard's samples; once iterated, `sha256` and `nbytes` describe the source.

    Args:
        url: Local path or fsspec URL of a tar shard.
        on_error: ``fail`` raises `GenddError` at the first bad sample or broken tar;
            ``skip`` yields a `Skipped` record instead and goes on.
        num_classes: Labels must lie in 0..num_classes-1 (or be -1); None checks only >= -1.
        decode: Decode each image as it is read; False yields samples that keep their encoded bytes, to be
            decoded by whoever renders them (and an image that then fails to decode goes to `skip`).
    """

    def __init__(self, url: str, on_error: str = "fail", num_classes: int | None = None, decode: bool = True):
        if on_error not in ("fail", "skip"):
            raise GenddError(f"on_error must be fail or skip, not {on_error!r}")
        self.url, self.on_error, self.num_classes, self.decode = url, on_error, num_classes, decode
        self.sha256: str | None = None
        self.nbytes = 0

    def __iter__(self) -> Iterator[Sample | Skipped]:
        try:
            handle = fsspec.open(self.url, "rb").open()
        except Exception as exc:  # no such file, an unknown protocol, a refusing server (HTTP 403)...
            explained = explain(exc, self.url, "open the shard")
            if explained is not None:
                raise explained from exc
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GenddError(f"{public_url(self.url)}: cannot open shard ({public_url(reason)[:200]})") from exc
        with handle:
            reader = _HashingReader(handle)
            yield from self._samples(io.BufferedReader(reader, buffer_size=1 << 20))
            reader.drain()
            self.sha256, self.nbytes = reader.sha256.hexdigest(), reader.nbytes

    def _samples(self, stream) -> Iterator[Sample | Skipped]:
        """Group members into samples (a new key ends the previous sample) and decode each."""
        seen: set[str] = set()
        group: dict = {}
        last = None  # the last sample read in full: its key and extensions
        try:
            for name, data in tar_members(stream):
                key, ext = base_plus_ext(name)
                if key is None:
                    continue  # no extension: not part of any sample
                if group and key != group["__key__"]:
                    yield self._decode(group, seen)
                    last, group = (group["__key__"], set(group) - {"__key__"}), {}
                group.setdefault("__key__", key)
                ext = ext.lower()
                if ext in group:
                    group["__twice__"] = f"member {name} appears twice"
                group[ext] = data
        except _Break as cut:
            # The sample being read when the tar broke is whole if the broken member is the next sample's, or,
            # where the break is in a header, if it has the members the sample before it had.
            if cut.member is not None:
                whole = base_plus_ext(cut.member)[0] != group.get("__key__")
            else:
                whole = last is not None and set(group) - {"__key__"} == last[1]
            if group and whole:
                yield self._decode(group, seen)
                last = (group["__key__"], None)
            elif group:
                yield self.skip(group["__key__"], f"may be cut off: the tar breaks at byte {cut.offset}, inside it "
                                "or before another of its members")
            after = last[0] if last else None
            yield self.skip(None, f"tar breaks at byte {cut.offset} after sample {after!r} ({cut})",
                            offset=cut.offset, after=after)
            return
        if group:
            yield self._decode(group, seen)

    def _decode(self, group: dict, seen: set[str]) -> Sample | Skipped:
        key = group["__key__"]
        if key in seen:
            return self.skip(key, "duplicate key: an earlier sample of this shard has it (that one is kept)")
        seen.add(key)
        if "__twice__" in group:
            return self.skip(key, group["__twice__"])
        try:
            return decode_sample(group, self.num_classes, self.decode)
        except ValueError as exc:
            return self.skip(key, str(exc))

    def skip(self, key: str | None, reason: str, **where) -> Skipped:
        """The record of a bad sample of this shard; raises it as a `GenddError` instead when ``on_error`` is fail."""
        if self.on_error == "fail":
            prefix = f"sample {key}: " if key is not None else ""
            raise GenddError(f"{public_url(self.url)}: {prefix}{reason}")
        return Skipped(key, reason, **where)
