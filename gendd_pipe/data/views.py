"""Replayable views: a crop box and a flip, stored as fractions of the source image.

A view is ``(top, left, height, width, hflip)`` (`gendd_pipe.store.format.VIEW_FIELDS`)
with the box in fractions of the source image. View 0 is the deterministic eval view, the box that timm's eval
transform (resize the short edge to ``size / crop_pct``, center crop ``size``)
cuts from the source. Views ``1..V-1`` follow torchvision's RandomResizedCrop
sampling plus a horizontal flip, drawn from a generator seeded by
``(seed, key, view)`` so that re-runs and resumes write identical views.

How a view becomes pixels is the renderers' part (`gendd_pipe.data.render`).
"""

from __future__ import annotations

import math
import numpy as np
from pydantic import field_validator

from gendd_pipe import seeds
from gendd_pipe.config import NonNegativeInt, PositiveInt, Probability, Range, configclass
from gendd_pipe.data.render import RENDERERS



@configclass
class ViewConfig:
    """How the cached views of each image are drawn."""

    count: PositiveInt = 4  # views per image; view 0 is the eval view
    scale: Range = (0.08, 1.0)  # random-resized-crop area range (timm's default)
    ratio: Range = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    hflip: Probability = 0.5  # probability of a horizontal flip in views 1..count-1
    seed: NonNegativeInt = 0  # with (key, view) this fixes every view
    renderer: str = "pil"  # how pixels are cut from a view: pil | tensor (torchvision, one decode per image)

    @field_validator("renderer")
    @classmethod
    def _renderer(cls, value: str) -> str:
        if value not in RENDERERS:
            raise ValueError(f"must be one of {', '.join(RENDERERS)}")
        return value


def eval_view(width: int, height: int, size: tuple[int, int], crop_pct: float, crop_mode: str) -> np.ndarray:
    """The box timm's eval transform cuts from a ``width x height`` image, as a view.

    Args:
        width: Source image width in pixels.
        height: Source image height in pixels.
        size: Output (height, width).
        crop_pct: timm's crop fraction; the short edge is first resized to ``size / crop_pct``.
        crop_mode: ``center`` (keep aspect, resize the short edge) or ``squash``.
    """
    out_h, out_w = size
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if crop_mode == "squash":
        new_h, new_w = scale_h, scale_w
    elif crop_mode in ("center", None):
        if scale_h != scale_w:
            raise ValueError("center crop of a non-square input size is not supported")
        # torchvision Resize(int): the short edge becomes scale, the long edge is truncated.
        if width <= height:
            new_w, new_h = scale_w, int(scale_w * height / width)
        else:
            new_h, new_w = scale_h, int(scale_h * width / height)
    else:
        raise ValueError(f"crop_mode {crop_mode!r} is not supported (use center or squash)")
    # torchvision CenterCrop offsets, in resized pixels, then as fractions.
    top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
    return np.array([top / new_h, left / new_w, out_h / new_h, out_w / new_w, 0.0], dtype=np.float32)


def random_view(width: int, height: int, cfg: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """A random-resized-crop box plus flip, sampled as torchvision's RandomResizedCrop does."""
    area = width * height
    log_ratio = np.log(cfg.ratio)
    for _ in range(10):
        target_area = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # fall back to a central crop within the ratio bounds
        in_ratio = width / height
        if in_ratio < min(cfg.ratio):
            w, h = width, int(round(width / min(cfg.ratio)))
        elif in_ratio > max(cfg.ratio):
            w, h = int(round(height * max(cfg.ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = float(rng.random() < cfg.hflip)
    return np.array([top / height, left / width, h / height, w / width, flip], dtype=np.float32)


def sample_views(key: str, width: int, height: int, cfg: ViewConfig, size: tuple[int, int], crop_pct: float,
                 crop_mode: str, which: list[int] | None = None) -> np.ndarray:
    """The views ``which`` (default all ``cfg.count``) of one image, shape (k, 5): view 0 the eval view, view v a
    random one drawn from (seed, key, v)."""
    which = range(cfg.count) if which is None else which
    return np.stack([eval_view(width, height, size, crop_pct, crop_mode) if v == 0 else
                     random_view(width, height, cfg, seeds.rng(cfg.seed, key, v)) for v in which])
