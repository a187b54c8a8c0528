"""A live teacher: the teacher run beside the student at every step, in place of a feature store.

A run that names ``teacher`` (a timm name, weights and input size, as an extraction names one, and the views
and augmentation to draw) takes its teacher outputs from that network, run in the training process on the
run's device under ``no_grad`` and the run's precision, each torchrun rank on its own batches. Its views are
drawn as an extraction of these settings draws them (`gendd_pipe.data.plan`):

- ``views.count`` None (the default, the official online run): in epoch e every image is seen at its view
  ``1 + e``, a crop (and RandAugment, color jitter and mix, as configured) never seen before, so a run of E
  epochs sees the views an (E + 1)-view store would hold, each once;
- ``views.count`` N: the N views an N-view store holds, one picked per epoch as a cached run picks it (what
  shows the cached path equal to this one, `tests/test_live.py`).

The loader's workers render each view at the student's and at the teacher's input size (once where the two
are the same); a batch then carries the teacher's ``feature`` of each view, and its logits come from the
teacher's classifier as a derived store's do, so no method can tell the sources apart.
"""

from __future__ import annotations

import logging
from dataclasses import field, replace
from functools import partial

import torch
from pydantic import model_validator
from torch.utils.data import DataLoader

from gendd_pipe.config import PositiveInt, configclass, narrow, to_dict
from gendd_pipe.data.augment import AugmentConfig
from gendd_pipe.data.loader import JoinedRow, LoaderConfig, rows_pipeline
from gendd_pipe.data.plan import plan_views
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import ShardReader, shard_labels, shard_name
from gendd_pipe.data.streams import naming_the_sample
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.distill.methods import TeacherHead
from gendd_pipe.errors import GenddError
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.runtime import RuntimeConfig
from gendd_pipe.shard_task import view_manifest

log = logging.getLogger(__name__)


@configclass
class LiveViews(ViewConfig):
    """How a live teacher's views are drawn: as an extraction of these settings draws them (`ViewConfig`)."""

    count: PositiveInt | None = None  # None: view 1 + e of every image in epoch e, each seen once; N: the N views
    # an N-view store holds, one picked per epoch as a cached run picks it


@configclass
class LiveTeacherConfig(TeacherConfig):
    """A teacher run beside the student in place of a store: the network (`TeacherConfig`), and its views and
    their augmentation, as an extraction's."""

    views: LiveViews = field(default_factory=LiveViews)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # RandAugment, color jitter, mixes per view

    @model_validator(mode="after")
    def _replayable(self):
        if (self.augment.randaugment or self.augment.color_jitter) and self.views.renderer != "pil":
            raise ValueError("augment: RandAugment and color jitter apply to Pillow images; use views.renderer pil")
        return self


def live_rows(urls, plan, mixed: bool, fresh: bool, epoch: int = 0):
    """Pipeline stage: ``{"url", "rows": (first, end)}`` -> a `JoinedRow` for each of those rows of the image
    shard, its block the views ``plan`` draws (``plan(samples, which)``): the eval view and view ``1 + epoch``
    when ``fresh``, else all of them. A shard whose views are ``mixed`` is held whole (a row's partner may be any
    of its samples), as a mixed store's is."""
    which = [0, 1 + epoch] if fresh else None
    for item in urls:
        url, (first, end) = item["url"], item["rows"]
        reader = ShardReader(url, on_error="fail", decode=False)
        if mixed:
            samples = list(reader)
            with naming_the_sample(url, samples[0]):  # (the images' sizes are read to draw their crops)
                block = plan(samples, which=which)
            for row in range(first, end):
                yield JoinedRow(url, samples[row], row, block, None, samples)
            continue
        for i, sample in enumerate(reader):
            if i >= end:
                break
            if i >= first:
                with naming_the_sample(url, sample):
                    block = plan([sample], which=which)
                yield JoinedRow(url, sample, 0, block, None)


class LiveTeacher:
    """A run's live teacher, built on the run's device: ``manifest`` holds the sections a store of these settings
    records (teacher, preprocessing, views, augment, logits), which is what the run and its checkpoints know of
    it; `check` and `head` stand in for a store's counts and head, `pipeline` for its loader and `outputs` for
    its features."""

    def __init__(self, cfg: LiveTeacherConfig, runtime: RuntimeConfig, device: torch.device):
        self.config = cfg
        self.teacher = create_teacher(narrow(cfg, TeacherConfig), replace(runtime, device=str(device)))
        self.linear = self.teacher.linear_head
        self.manifest = {**view_manifest(self.teacher, cfg.views, cfg.augment),
                         "logits": {"mode": "derived" if self.linear else "full"}}
        self.name = f"live teacher {cfg.name}"
        self.replay = Replay(self.manifest, self.teacher.data_config)
        log.info("%s on %s: %s", self.name, device, "a fresh view of each image every epoch" if cfg.views.count is None
                 else f"the {cfg.views.count} views of a {cfg.views.count}-view store")

    @property
    def num_views(self) -> int:
        """Views per row of the loader's blocks: the eval view and this epoch's view, or ``views.count``."""
        return self.config.views.count or 2

    def check(self, urls: list[str], unsupervised: bool) -> dict[str, int]:
        """Samples per shard name of the train shards, refusing labels outside the teacher's classifier (and,
        for a supervised run, samples without one)."""
        counts, low, top = shard_labels(urls)
        classes = self.teacher.num_classes
        if top >= classes:
            raise GenddError(f"{self.name}: its classifier has {classes} classes but the train shards have label "
                             f"{top}; give the teacher these shards' classes (fine-tune it: the teacher stage)")
        if low < 0 and not unsupervised:
            raise GenddError(f"{self.name}: the train shards have unlabeled samples (no cls); the method is "
                             "supervised (pass --unsupervised)")
        return {shard_name(u): n for u, n in counts.items()}

    @property
    def plan(self):
        """``plan(samples, which=None)``: the views ``which`` (default all ``views.count``) of a shard's rows
        (`plan_views`), with nothing of the network in it (it goes to the loader's workers)."""
        views = ViewConfig(**{**to_dict(self.config.views), "count": self.num_views})
        return partial(plan_views, views=views, augment=self.config.augment, replay=self.replay,
                       data_config=self.teacher.data_config)

    def head(self, url: str, batch_size: int) -> TeacherHead:
        """The teacher's classifier and the mean norm of its features of the eval views of the shard at ``url``
        (a store's head: its classifier and its view 0 of the first shard)."""
        weight, bias = self.teacher.head()
        samples = list(ShardReader(url, on_error="fail", decode=False))
        norms = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            with naming_the_sample(url, chunk[0]):
                block = self.plan(chunk, which=[0])
                pixels = torch.cat([self.replay.views(s, {k: a[i] for k, a in block.items()}, chunk, block)
                                    for i, s in enumerate(chunk)])
            norms.append(self.teacher.forward(pixels)[0].norm(dim=1).cpu())
        return TeacherHead(torch.from_numpy(weight), torch.from_numpy(bias), float(torch.cat(norms).mean()))

    def pipeline(self, urls: list[str], data_config: dict, cfg: LoaderConfig, seed: int, epoch: int,
                 counts: dict[str, int], cuda: bool = False, soft_labels: bool = False,
                 fresh_scale: tuple[float, float] | None = None) -> DataLoader:
        """This rank's training batches, as `gendd_pipe.data.loader.train_pipeline` makes them from a store, with
        ``teacher_image`` (uint8, the teacher's input size) in place of the teacher's outputs."""
        fresh = self.config.views.count is None
        if fresh and cfg.views is not None:
            raise GenddError(f"loader.views {cfg.views}: the {self.name} draws a fresh view every epoch; to train on "
                             "a fixed set of N views, set teacher.views.count N")
        if cfg.views is not None and cfg.views > self.num_views:
            raise GenddError(f"loader.views {cfg.views}: the {self.name} draws {self.num_views} views per image "
                             f"(teacher.views.count); use at most {self.num_views}")
        if fresh:  # slot 1 of each row's block is this epoch's view
            cfg = replace(cfg, views=None, eval_view=False)
        source = partial(live_rows, plan=self.plan, mixed=self.config.augment.mixing, fresh=fresh)
        return rows_pipeline(urls, counts, self.manifest, self.num_views, source, data_config, cfg, seed, epoch,
                             cuda, soft_labels, fresh_scale, teacher=self.replay, where=self.name)

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 views (N, 3, H, W) -> what a store gives for them, float32 on the teacher's device: ``feature``
        (N, D), and ``logits`` (N, C) where they are not the features through the classifier (which the
        training loop applies, as for a derived store)."""
        features, logits = self.teacher.forward(images)
        return {"feature": features} if self.linear else {"feature": features, "logits": logits}
