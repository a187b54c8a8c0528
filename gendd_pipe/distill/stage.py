"""Stage ``distill@RUN``: the ``distill`` section of a recipe, and one run of it trained into the layout.

A recipe's ``distill`` section names the store, the shards and an output root,
then ``common`` settings and ``runs`` (a run that names a live ``teacher`` learns from it instead of the store,
`gendd_pipe.distill.live`): each run is ``common`` with the run's own
keys laid over it, and its method defaults to the run's name. A run writes
``OUT/runs/RUN/`` (checkpoints, per-epoch metrics, config.yaml),
``OUT/metrics/RUN.json`` (best and last epoch, for ``dvc metrics``) and
``OUT/plots/RUN.csv`` (val top-1 per epoch, for ``dvc plots``). GenDD runs share their stage 1 through
``OUT/stage1/`` (`gendd_pipe.distill.stage1`): a sweep over stage-2 settings trains it once.

Under DVC the run directory is a ``persist: true`` output: a run killed midway
resumes from its last checkpoint when its settings are unchanged; a finished run,
or one with other settings, starts afresh (DVC re-runs the stage because an input
changed). The CLI instead refuses a directory that holds a run unless told to resume.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import field

from pydantic import model_validator

from gendd_pipe.config import ConfigError, OutputDir, RunName, Shards, configclass, merged, to_dict
from gendd_pipe.distill.checkpoint import read_checkpoint
from gendd_pipe.distill.config import DistillConfig, parse_run
from gendd_pipe.distill.methods import get_method
from gendd_pipe.distill.train import distill, on_rank0, run_differences
from gendd_pipe.errors import GenddError
from gendd_pipe.files import write_json, write_yaml
from gendd_pipe.layout import LAST, checkpoint_in, config_beside, run_dir, run_metrics, run_plot, stage1_cache
from gendd_pipe.metrics import read_epochs

log = logging.getLogger(__name__)


@configclass(kw_only=True)
class DistillStage:
    """The ``distill`` section: where students learn from, where they go, and the runs."""

    store: str | None = None  # the feature store (path or URL) of the runs that name no live teacher
    shards: Shards  # train image shards
    val_shards: Shards  # val image shards
    out: OutputDir  # root of runs/RUN, metrics/RUN.json, plots/RUN.csv
    common: dict = field(default_factory=dict)  # settings of every run: DistillConfig fields and method sections
    runs: dict[RunName, dict | None] = field(default_factory=dict)  # run name -> its own settings over common

    @model_validator(mode="after")
    def _every_run_validates(self):
        for name in self.runs or {"": None}:  # with no runs, common alone
            run = self.run(name) if name else parse_run(merged({"method": DistillConfig.method}, self.common),
                                                        "distill.common")
            if run.teacher is None and not self.store:
                raise ConfigError("distill", ("store",), f"run {name or 'common'} names no live teacher, so it "
                                  "learns from a store: set distill.store (or the run's teacher)")
        return self

    def source(self, name: str) -> str | None:
        """The store run ``name`` learns from: ``store``, or None for a run that names a live teacher."""
        return None if self.run(name).teacher else self.store

    def run(self, name: str) -> DistillConfig:
        """The resolved settings of run ``name``."""
        if name not in self.runs:
            raise GenddError(f"distill.runs: no run {name!r} (have: {', '.join(self.runs) or 'none'})")
        own = self.runs[name] or {}
        try:
            return parse_run(merged(merged({"method": name}, self.common), own), f"distill.runs.{name}")
        except ConfigError as exc:  # name the key where it was written
            if exc.loc and not _holds(own, exc.loc) and _holds(self.common, exc.loc):
                raise ConfigError("distill.common", exc.loc, exc.reason) from None
            raise


    def resolved(self, name: str) -> dict:
        """Run ``name`` as a ``distill`` section of its own: every setting written out, nothing from ``common``."""
        return {**to_dict(self), "common": {}, "runs": {name: self.run(name).to_dict()}}


def _holds(data: Mapping, loc: tuple) -> bool:
    for key in loc:
        if not isinstance(data, Mapping) or key not in data:
            return False
        data = data[key]
    return True


def _fresh_or_resume(directory: str, cfg: DistillConfig) -> bool:
    """DVC's rule for a persistent run directory: True to resume it; otherwise it is cleared for a fresh run."""
    path = checkpoint_in(directory, LAST)
    if not os.path.exists(path):
        return False
    ckpt = read_checkpoint(path)
    if not run_differences(cfg, ckpt["config"]) and ckpt["epoch"] < cfg.epochs:
        log.info("%s: resuming after epoch %d of %d", directory, ckpt["epoch"], cfg.epochs)
        return True
    log.info("%s: holds a finished run or one with other settings; starting afresh", directory)
    shutil.rmtree(directory)
    return False


def write_curve(directory: str, path: str) -> None:
    """Val top-1 of every predictor per epoch, as a CSV for ``dvc plots`` and the report."""
    lines = read_epochs(directory)
    predictors = [k for k, v in lines[0]["val"].items() if isinstance(v, dict)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", *predictors])
        for m in lines:
            writer.writerow([m["epoch"], round(m["train"]["loss"], 5), *(m["val"][p]["top1"] for p in predictors)])


def run_stage(cfg: DistillStage, run: str, resume: bool | None = None, progress: bool = True) -> dict:
    """Train run ``run`` into the layout under ``cfg.out``.

    Args:
        resume: True continues the run in its directory, False refuses a directory that holds one, None (a
            DVC stage) resumes an unfinished run of the same settings and otherwise starts afresh.
    """
    config = cfg.run(run)
    directory = run_dir(cfg.out, run)
    if resume is None:  # decided (and a stale run cleared) by rank 0 alone under torchrun
        resume = on_rank0(lambda: _fresh_or_resume(directory, config), config.runtime)
    summary = distill(cfg.source(run), list(cfg.shards), list(cfg.val_shards), directory, config, resume=resume,
                      progress=progress, stage1_cache=stage1_cache(cfg.out))
    if not summary:  # a torchrun process other than rank 0
        return summary
    write_yaml(config_beside(directory), cfg.resolved(run))
    write_json(run_metrics(cfg.out, run), {"run": run, "method": config.method, "unsupervised": config.unsupervised,
                                           "predictor": get_method(config.method).primary, **summary})
    write_curve(directory, run_plot(cfg.out, run))
    return summary
