"""Replaying a store's views: the pixels of a cached view from its stored crop, RandAugment draw and mix.

One `Replay` serves the extraction (the teacher's input), the student's loader and
``verify --recompute``, so all three make the same bytes: the renderer cuts the
view's box (`gendd_pipe.data.render`), RandAugment applies its stored draw with
timm's ops, then the view is mixed with its partner's view of the same index
(`gendd_pipe.data.augment`). A store without an ``augment`` section replays its
crops alone, as before.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.functional import pil_to_tensor

from gendd_pipe.data.augment import apply_jitter, apply_randaugment, is_mixed, mix_pixels, parse_randaugment
from gendd_pipe.data.render import create_renderer, render_view
from gendd_pipe.data.shards import Sample


class Replay:
    """Pixels of stored views at one output size.

    Args:
        manifest: The store's manifest (its ``views`` renderer, ``augment`` section and the teacher's
            ``preprocessing`` interpolation, which every replay uses: a student resamples as the teacher did).
        data_config: The network's data config: its ``input_size``, and its ``interpolation`` where the manifest
            has none yet (the extraction's own, while it writes the manifest).
    """

    def __init__(self, manifest: dict, data_config: dict):
        self.renderer = manifest["views"].get("renderer", "pil")
        self.render = create_renderer(self.renderer)
        self.size = tuple(data_config["input_size"][1:])
        self.interpolation = (manifest.get("preprocessing") or {}).get("interpolation", data_config["interpolation"])
        section = manifest.get("augment") or {}
        self.randaugment = None
        if section.get("randaugment"):
            self.randaugment = parse_randaugment(section["randaugment"], self.size, tuple(section["fill"]),
                                                 self.interpolation)

    def base(self, sample: Sample, views: np.ndarray, draws: np.ndarray | None = None,
             jitters: np.ndarray | None = None) -> torch.Tensor:
        """Views (k, 5) of ``sample`` with their color jitters (k, 6) and RandAugment draws (k, L, 3) -> uint8
        (k, 3, H, W), unmixed."""
        if (self.randaugment is None or draws is None) and jitters is None:
            return self.render(sample, views, self.size, self.interpolation)
        image, out = sample.rgb(), []
        for i, view in enumerate(views):
            pixels = render_view(image, view, self.size, self.interpolation)
            if jitters is not None:
                pixels = apply_jitter(pixels, jitters[i])
            if self.randaugment is not None and draws is not None:
                pixels = apply_randaugment(pixels, draws[i], self.randaugment)
            out.append(pil_to_tensor(pixels))
        return torch.stack(out)

    def views(self, sample: Sample, row: dict[str, np.ndarray], partners: list[Sample] | None = None,
              rows: dict[str, np.ndarray] | None = None, which: list[int] | None = None) -> torch.Tensor:
        """The views ``which`` (default all) of one stored row -> uint8 (k, 3, H, W).

        Args:
            row: The row's ``views`` (V, 5) and, where stored, ``jitter`` (V, 6), ``augment`` (V, L, 3) and ``mix``
                (V, 7).
            partners: The shard's samples by row, for mixed views.
            rows: The shard's ``views``, ``jitter`` and ``augment`` arrays (n, V, ...), for the partners' own views.
        """
        which = list(range(len(row["views"]))) if which is None else which
        draws = row["augment"][which] if "augment" in row else None
        jitters = row["jitter"][which] if "jitter" in row else None
        pixels = self.base(sample, row["views"][which], draws, jitters)
        if "mix" not in row:
            return pixels
        out = []
        for pixel, v in zip(pixels, which):
            mix = row["mix"][v]
            if is_mixed(mix):
                j = int(mix[0])
                partner_draw = rows["augment"][j, v][None] if "augment" in rows else None
                partner_jitter = rows["jitter"][j, v][None] if "jitter" in rows else None
                pixel = mix_pixels(pixel, self.base(partners[j], rows["views"][j, v][None], partner_draw,
                                                    partner_jitter)[0], mix)
            out.append(pixel)
        return torch.stack(out)
