"""Seeded randomness: every draw that must come out the same in another process, on another machine or in a
resumed run is made here, from a seed and the parts that name the draw.

A draw is named by ``(seed, *parts)``: the view seed with a sample's key and a view index for the crops and
augmentations extraction stores, the training seed with an epoch for what the loader draws each epoch. The
name is hashed (SHA-256 of the parts, NUL-separated), so two draws share a stream only when they share a name,
whatever the process, the order of the work or the number of workers. Extraction and the loader both draw
through these functions, which is what lets the loader replay a store (`tests/test_views.py` checks a 16-view
store's every kind of draw against them).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

TORCH_SEED_STRIDES = (1_000_003, 101)  # `torch_seed`: seed, then epoch, then rank


def digest(seed: int, *parts) -> bytes:
    """SHA-256 of ``seed`` and ``parts``, NUL-separated."""
    return hashlib.sha256("\x00".join(map(str, (seed, *parts))).encode()).digest()


def rng(seed: int, *parts) -> np.random.Generator:
    """A numpy generator for the draw named ``(seed, *parts)``."""
    return np.random.default_rng(np.frombuffer(digest(seed, *parts), dtype=np.uint32))


def index(count: int, seed: int, *parts) -> int:
    """A uniform index below ``count`` for the draw named ``(seed, *parts)``."""
    return int.from_bytes(digest(seed, *parts)[:8], "little") % count


def shuffler(seed: int, *parts) -> random.Random:
    """A stdlib generator (what ``random.shuffle`` and webdataset's ``shuffle`` take) for ``(seed, *parts)``."""
    return random.Random(":".join(map(str, (seed, *parts))))


def torch_seed(seed: int, *parts: int) -> int:
    """The ``torch.manual_seed`` of a run's seed and up to two integer parts (an epoch, a rank): distinct for
    every epoch below a million and rank below 101."""
    for stride, part in zip(TORCH_SEED_STRIDES, parts, strict=False):
        seed = seed * stride + part
    return seed
