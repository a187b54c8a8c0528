"""Scoring a student: top-1/top-5 of each predictor on val shards, and the linear probe.

Predictors are the method's own (``student``, the student's linear head, for
every method; ``gendd``, features sampled from the diffusion head and read by
the teacher classifier) plus ``probe`` (a linear probe fitted on frozen student
features of the train shards: the unsupervised metric). `evaluate_checkpoint`
rebuilds a student from its checkpoint alone: no store and no teacher are
needed. A method's prediction settings (its section's ``predict``, such as
GenDD's sampling steps) can be overridden per section: ``{gendd: {samples: 4}}``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import field

import torch
import torch.distributed as dist
from pydantic import model_validator

from gendd_pipe.config import (ConfigError, NonNegativeInt, OutputDir, PositiveInt, Shards, configclass, join_key,
                               merged, parse, to_dict, unknown_key)
from gendd_pipe.data.streams import eval_pipeline
from gendd_pipe.data.shards import expand_urls
from gendd_pipe.distill.checkpoint import load_state, read_checkpoint
from gendd_pipe.distill.config import parse_run, upgrade
from gendd_pipe.distill.methods import Method, TeacherHead, create_method, sections
from gendd_pipe.distill.probe import probe_score, student_features
from gendd_pipe.errors import GenddError
from gendd_pipe.files import write_json, write_yaml
from gendd_pipe.layout import checkpoint as checkpoint_path
from gendd_pipe.layout import config_beside, eval_result
from gendd_pipe.metrics import as_percent, topk_hits
from gendd_pipe.models.student import create_student
from gendd_pipe.runtime import RuntimeConfig, autocast, network_input, place, rank_device


@torch.no_grad()
def evaluate(method: Method, val_urls: list[str], batch_size: int = 128, predict=None,
             probe_urls: list[str] | None = None, num_workers: int | None = None,
             runtime: RuntimeConfig = RuntimeConfig()) -> dict:
    """Top-1/top-5 (percent) of every predictor of ``method`` (on its device) on ``val_urls``.

    Args:
        predict: the method's prediction settings (its section's ``predict``); None: the run's own.
        probe_urls: train shards to fit a linear probe on; None skips the probe.
        runtime: the precision and memory format of the forward (its device is the method's).
    """
    was_training = method.training
    method.eval()
    device, data_config = next(method.parameters()).device, method.student.data_config
    hits: dict[str, Counter] = {}
    val_x, val_y = [], []  # labeled val features, kept for the probe
    n, start = 0, time.perf_counter()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's draws untouched
        torch.manual_seed(rank)  # sampled predictions (GenDD's) repeat run to run for one world size
        for batch in eval_pipeline(val_urls, data_config, batch_size, num_workers, device.type == "cuda"):
            keep = batch["label"] >= 0
            if not keep.any():
                continue
            labels = batch["label"][keep]
            images = network_input(batch["image"], data_config, runtime, device)  # the pinned batch, copied once
            if not keep.all():
                images = images[keep.to(device)]
            with autocast(runtime, device):
                features = method.student.features(images)
                predictions = method.predict(features, predict)
            for name, logits in predictions.items():
                hits.setdefault(name, Counter()).update(topk_hits(logits.float().cpu(), labels))
            if probe_urls:
                val_x.append(features.float().cpu())
                val_y.append(labels)
            n += int(keep.sum())
    parts = _gathered((hits, n, val_x, val_y))  # under torchrun each rank scored its share: rank 0 holds them all
    train = student_features(method.student, probe_urls, batch_size, num_workers, runtime) if probe_urls else None
    train = _gathered(train) if probe_urls else None
    result = None
    if parts is not None:
        try:
            result = _scored(parts, train, val_urls, probe_urls, device, start)
        except GenddError as exc:  # every rank stops with the one line
            result = exc
    method.train(was_training)
    return _from_rank0(result)


def _scored(parts: list, train: list | None, val_urls: list[str], probe_urls: list[str] | None,
            device: torch.device, start: float) -> dict:
    """Every rank's (hits, count, val features, val labels) summed into top-1/top-5 per predictor, and the probe
    fitted once on ``device`` from every rank's train features (``train``)."""
    hits = {}
    for part in parts:
        for name, counts in part[0].items():
            hits.setdefault(name, Counter()).update(counts)
    n = sum(part[1] for part in parts)
    if n == 0:
        raise GenddError(f"{val_urls[0]}: no labeled val samples to score (every label is -1)")
    result = {name: as_percent(h, n) for name, h in hits.items()}
    result["images"], result["seconds"] = n, time.perf_counter() - start
    if probe_urls:
        train = tuple(torch.cat(t) for t in zip(*train))
        val = tuple(torch.cat([t for part in parts for t in part[i]]) for i in (2, 3))
        result["probe"] = probe_score(train, val, probe_urls[0], device)
    return result


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gathered(part) -> list | None:
    """``part`` of every torchrun rank, in rank order, on rank 0 (None on the others; ``[part]`` outside
    torchrun)."""
    if not _distributed():
        return [part]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    return parts


def _from_rank0(result: dict | GenddError | None) -> dict:
    """Rank 0's result on every torchrun rank, or its error raised on every rank."""
    if _distributed():
        box = [str(result) if isinstance(result, GenddError) else result]
        dist.broadcast_object_list(box, src=0)
        result = GenddError(box[0]) if isinstance(box[0], str) else box[0]
    if isinstance(result, GenddError):
        raise result
    return result


def load_method(path: str):
    """Rebuild the trained method (student and, for GenDD, its head) from a checkpoint alone, on the CPU whatever
    device trained it; returns the method, its `DistillConfig` and the checkpoint dict."""
    ckpt = read_checkpoint(path)
    cfg = parse_run(upgrade(ckpt["config"]), f"{path}: config")
    teacher = ckpt["teacher"]
    num_classes, dim = teacher["head_shape"]
    head = TeacherHead(torch.zeros(num_classes, dim), torch.zeros(num_classes), teacher["feature_norm"])
    method = create_method(cfg, create_student(cfg.student, num_classes), head)
    load_state(method, ckpt["state_dict"], path)
    return method.eval(), cfg, ckpt


def predict_options(method: Method, overrides: Mapping | None, where: str = "evaluate.predict"):
    """The run's prediction settings with ``overrides[method.section]`` laid over them (None: it has none)."""
    own = getattr(method.options, "predict", None)
    if own is None:
        return None
    change = (overrides or {}).get(method.section) or {}
    where = join_key(where, method.section)
    predict = parse(type(own), merged(to_dict(own), change), where)
    parse(type(method.options), {**to_dict(method.options), "predict": to_dict(predict)}, where)  # cross-field checks
    return predict


def evaluate_checkpoint(path: str, val_shards: list[str], train_shards: list[str] | None = None,
                        batch_size: int = 128, predict: Mapping | None = None, input_size: int | None = None,
                        num_workers: int | None = None, runtime: RuntimeConfig = RuntimeConfig()) -> dict:
    """Score a saved student on val shards (and, with ``train_shards``, its linear probe) on ``runtime``'s device
    and precision.

    Args:
        predict: per method section, overrides of its prediction settings (``{"gendd": {"samples": 4}}``).
        input_size: refuse a student trained at another input size.
    """
    method, cfg, ckpt = load_method(path)
    place(method, runtime, rank_device(runtime))
    trained = method.student.input_hw
    if input_size is not None and (input_size, input_size) != tuple(trained):
        raise GenddError(f"{path}: the student was trained at input {trained[0]}x{trained[1]}, not {input_size}")
    options = predict_options(method, predict)
    result = evaluate(method, expand_urls(val_shards), batch_size, options,
                      expand_urls(train_shards) if train_shards else None, num_workers, runtime)
    return {"checkpoint": path, "method": cfg.method, "epoch": ckpt["epoch"],
            "predict": to_dict(options) if options is not None else {}, **result}


@configclass(kw_only=True)
class EvaluateStage:
    """Stage ``evaluate@RUN``: score a run's checkpoint on the val shards."""

    distill: str | None = None  # the distill stage's out (runs/RUN/); needed unless checkpoint is a file
    checkpoint: str = "both"  # both (last, and best beside it) | last | best checkpoint of the run, or a file
    val_shards: Shards
    train_shards: Shards | None = None  # fit a linear probe on these as well
    out: OutputDir | None = None  # RUN.json per run (None: the result is only returned)
    batch_size: PositiveInt = 128
    num_workers: NonNegativeInt | None = None  # DataLoader worker processes; None: sized to the cores
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device and precision of the forward
    input_size: PositiveInt | None = None  # refuse a student trained at another input size
    predict: dict[str, dict] = field(default_factory=dict)  # per method section: prediction overrides

    @model_validator(mode="after")
    def _known_sections(self):
        if self.checkpoint in ("both", "last", "best") and not self.distill:
            raise ConfigError("evaluate", ("distill",), f"required to find the run's {self.checkpoint} checkpoint "
                                                       "(or set checkpoint to a file)")
        known = sections()
        for key, change in self.predict.items():
            if key not in known:
                raise ConfigError("evaluate", ("predict", key), unknown_key(key, known))
            own = {f.name: f for f in dataclasses.fields(known[key])}.get("predict")
            if own is None:
                raise ConfigError("evaluate", ("predict", key), f"the {key} methods have no prediction settings")
            parse(own.default_factory, change, f"evaluate.predict.{key}")
        return self

    def checkpoint_of(self, run: str, which: str | None = None) -> str:
        which = which or self.checkpoint
        if which in ("both", "last", "best"):
            return checkpoint_path(self.distill, run, "last" if which == "both" else which)
        return which


def run_stage(cfg: EvaluateStage, run: str) -> dict:
    """Score run ``run``; writes ``out/RUN.json`` and the config beside it. With ``checkpoint: both`` the result is
    the last checkpoint's, and the best checkpoint's under ``best`` (as the official scripts score
    ``model_best``)."""
    path = cfg.checkpoint_of(run)
    if not os.path.exists(path):
        raise GenddError(f"{path}: no such checkpoint (has distill run {run!r} been trained?)")
    score = lambda p: evaluate_checkpoint(p, list(cfg.val_shards), list(cfg.train_shards or []) or None,  # noqa: E731
                                          cfg.batch_size, cfg.predict, cfg.input_size, cfg.num_workers, cfg.runtime)
    result = score(path)
    if cfg.checkpoint == "both" and os.path.exists(best := cfg.checkpoint_of(run, "best")):
        result["best"] = score(best)
    if cfg.out:
        out = eval_result(cfg.out, run)
        write_yaml(config_beside(out, is_dir=False), to_dict(cfg))
        write_json(out, {"run": run, **result})
    return result
