"""Drawing a shard's views: every array that makes a view's pixels, for any view indices.

A view is named by (view seed, key, index): view 0 is the eval view, unaugmented and unmixed; view k >= 1 is a
random-resized crop (`gendd_pipe.data.views`) with, as configured, a color jitter, a RandAugment draw and a mix
with a partner of the same shard (`gendd_pipe.data.augment`), each drawn from its own name. So the views of any
indices can be drawn alone and come out as an extraction of more views draws them: an extraction draws
``0..V-1``, growing a store to N draws ``V..N-1`` (`gendd_pipe.shard_task`), and a live teacher draws view
``1 + epoch`` of every image each epoch (`gendd_pipe.distill.live`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gendd_pipe import seeds
from gendd_pipe.data.augment import NO_JITTER, NO_MIX, AugmentConfig, draw_jitter, draw_mix, draw_randaugment, no_randaugment
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample
from gendd_pipe.data.views import ViewConfig, sample_views


def plan_views(samples: list[Sample], views: ViewConfig, augment: AugmentConfig, replay: Replay, data_config: dict,
               which: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The views ``which`` (default ``0..views.count-1``) of a shard's rows ``samples``: ``views`` (n, k, 5) and,
    as configured, ``jitter`` (n, k, 6), ``augment`` (n, k, L, 3) (drawn for the RandAugment that ``replay``
    applies) and ``mix`` (n, k, 7), each view drawn from (seed, key, index)."""
    which = list(range(views.count)) if which is None else list(which)
    size, crop = tuple(data_config["input_size"][1:]), (data_config["crop_pct"], data_config.get("crop_mode", "center"))
    plan = {"views": np.stack([sample_views(s.key, *s.image.size, views, size, *crop, which=which) for s in samples])}
    if augment.color_jitter > 0:
        plan["jitter"] = np.stack([[NO_JITTER if k == 0 else
                                    draw_jitter(augment.color_jitter, seeds.rng(views.seed, f"jitter:{s.key}", k))
                                    for k in which] for s in samples])
    randaugment = replay.randaugment
    if randaugment is not None:
        plan["augment"] = np.stack([[no_randaugment(randaugment.num_layers) if k == 0 else
                                     draw_randaugment(randaugment, seeds.rng(views.seed, f"randaugment:{s.key}", k))
                                     for k in which] for s in samples])
    if augment.mixing:
        plan["mix"] = np.stack([[NO_MIX if k == 0 else
                                 draw_mix(augment, seeds.rng(views.seed, f"mix:{s.key}", k), i, len(samples), size)
                                 for k in which] for i, s in enumerate(samples)])
    return plan
