"""Renderers: the one place pixels are made from cached views, for the teacher and for the student.

A renderer takes a `Sample` (decoded, or opened with its encoded bytes), its views
(V, 5) and an output size, and returns uint8 pixels (V, 3, H, W) on a device;
`gendd_pipe.runtime.normalize_pixels` turns them into the network's input where
they are, so only bytes cross to a GPU. Two are registered:

- ``pil``: Pillow decodes, and resamples each view's exact (fractional) box straight
  from the source (`render_view`). The default; view 0 equals timm's eval transform.
- ``tensor``: torchvision decodes JPEGs (libjpeg-turbo) and cuts every view from the
  one decoded tensor with ``resized_crop`` (antialiased), the box rounded to whole
  source pixels; other formats are decoded by Pillow. It decodes once per image
  however many views it cuts.

Both render on the CPU, whatever device the network runs on, and move only the
finished uint8 views there: the student's loader and ``verify`` render on the CPU,
and a GPU decoder (nvjpeg) or GPU resize would give the teacher other pixels than
the student's (rounding in the IDCT and in the resampling).

The manifest records the renderer a store was extracted with (``views.renderer``)
and the student's loader renders with the same one, so the student sees the
pixels the teacher saw. `prefetched` runs rendering on threads ahead of the
forward (Pillow, libjpeg and torch release the GIL while they work).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Empty, Queue

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from PIL import Image
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2 import functional as TF

from gendd_pipe.data.shards import Sample
from gendd_pipe.errors import GenddError

TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def render_view(image: Image.Image, view: np.ndarray, size: tuple[int, int], interpolation: str) -> Image.Image:
    """Cut a view's box from ``image`` and resample it to ``size`` (height, width). Pillow resamples the
    fractional box straight from the source (``Image.resize(box=...)``), so a view replays exactly at any output
    size, and view 0 matches timm's resize-then-crop to float precision."""
    top, left, height, width, flip = (float(v) for v in view)
    w, h = image.size
    box = (left * w, top * h, (left + width) * w, (top + height) * h)
    out = image.resize((size[1], size[0]), resample=str_to_pil_interp(interpolation), box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip >= 0.5 else out


def render_pil(sample: Sample, views: np.ndarray, size: tuple[int, int], interpolation: str,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Views (V, 5) of ``sample`` by Pillow -> uint8 (V, 3, H, W) on ``device``."""
    image = sample.rgb()
    views = [pil_to_tensor(render_view(image, view, size, interpolation)) for view in views]
    pixels = views[0][None] if len(views) == 1 else torch.stack(views)  # one view (the loader's): no copy
    return pixels.to(device)


def decode_tensor(sample: Sample) -> torch.Tensor:
    """The sample's image as uint8 (3, H, W) on the CPU: torchvision's JPEG decoder for 8-bit RGB and grey JPEGs,
    Pillow for everything else."""
    image = sample.image
    if sample.data is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
        try:
            return decode_jpeg(torch.frombuffer(bytearray(sample.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise ValueError(f"unreadable {sample.ext} image ({str(exc).splitlines()[0]})") from exc
    return pil_to_tensor(sample.rgb())


def render_tensor(sample: Sample, views: np.ndarray, size: tuple[int, int], interpolation: str,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Views (V, 5) of ``sample`` by torchvision on the CPU -> uint8 (V, 3, H, W) on ``device``."""
    if interpolation not in TENSOR_INTERPOLATIONS:
        raise GenddError(f"renderer tensor: interpolation {interpolation!r} is not one torchvision resizes tensors "
                         f"with ({', '.join(TENSOR_INTERPOLATIONS)}); use the pil renderer")
    pixels = decode_tensor(sample)  # (3, H, W)
    h, w = pixels.shape[1:]
    out = []
    for top, left, height, width, flip in views.tolist():
        y, x = min(round(top * h), h - 1), min(round(left * w), w - 1)
        crop = TF.resized_crop(pixels, y, x, max(1, min(round(height * h), h - y)), max(1, min(round(width * w), w - x)),
                               list(size), interpolation=TF.InterpolationMode(interpolation), antialias=True)
        out.append(TF.horizontal_flip(crop) if flip >= 0.5 else crop)
    return torch.stack(out).to(device)  # (V, 3, H, W)


RENDERERS: dict[str, Callable[..., torch.Tensor]] = {"pil": render_pil, "tensor": render_tensor}


def create_renderer(name: str) -> Callable[..., torch.Tensor]:
    """The renderer registered under ``name``, or a one-line error naming the known ones."""
    if name not in RENDERERS:
        raise GenddError(f"unknown renderer {name!r} (known: {', '.join(RENDERERS)}); the store or option names one "
                         "this version does not have")
    return RENDERERS[name]


def render_pixels(renderer: str, sample: Sample, views: np.ndarray, data_config: dict,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Views (V, 5) of ``sample`` as uint8 pixels (V, 3, H, W), rendered by ``renderer`` at the data config's
    size and interpolation."""
    return create_renderer(renderer)(sample, views, tuple(data_config["input_size"][1:]), data_config["interpolation"],
                                     device)


def prefetched(fn: Callable, items: Iterable, threads: int, ahead: int) -> Iterator:
    """``fn(item)`` for every item, in order, computed by ``threads`` threads up to ``ahead`` items ahead of the
    consumer; the items themselves are drawn on a thread of their own. An exception raised by ``fn`` or while
    drawing reaches the consumer in the place of its item. Torch runs single-threaded on these threads: they
    are the parallelism, and the consumer's forward keeps its own threads."""
    futures: Queue = Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def draw():
        try:
            for item in items:
                if stop.is_set():
                    return
                futures.put(pool.submit(fn, item))
        except BaseException as exc:  # a reader that fails: the consumer raises it after the items before it
            failed = Future()
            failed.set_exception(exc)
            futures.put(failed)
        futures.put(None)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="render", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        drawer = threading.Thread(target=draw, name="render-draw", daemon=True)
        drawer.start()
        try:
            while (future := futures.get()) is not None:
                yield future.result()
        finally:
            stop.set()
            while drawer.is_alive():  # unblock a drawer waiting for room, dropping what it queued
                try:
                    pending = futures.get(timeout=0.05)
                except Empty:
                    continue
                if pending is not None:
                    pending.cancel()
