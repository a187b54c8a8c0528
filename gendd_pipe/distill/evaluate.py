"""Scoring a student: top-1/top-5 of each predictor on val shards, and the linear probe.

Predictors: ``student`` (the student's own linear head), ``gendd`` (features
sampled from the diffusion head, read by the teacher classifier; GenDD students
only) and ``probe`` (a linear probe fitted on frozen student features of the
train shards: the unsupervised metric). `evaluate_checkpoint` rebuilds a student
from its checkpoint alone: no store and no teacher are needed. `reference_probes`
gives the probes an unsupervised student is read beside: the teacher's cached
features and a randomly initialised student.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from gendd_pipe.data.loader import check_shards, eval_pipeline
from gendd_pipe.data.shards import expand_urls
from gendd_pipe.distill.checkpoint import load_method
from gendd_pipe.distill.methods import Method
from gendd_pipe.distill.probe import fit_probe, probe_logits
from gendd_pipe.errors import GenddError
from gendd_pipe.models.student import Student, StudentConfig, create_student
from gendd_pipe.store.reader import FeatureStore


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, int]:
    """Number of rows whose label is among the top-k logits, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hit = top == labels[:, None]
    return {f"top{k}": int(hit[:, :k].any(1).sum()) for k in ks}


def _as_percent(hits: dict[str, int], n: int) -> dict[str, float]:
    return {k: 100.0 * v / n for k, v in hits.items()}


@torch.no_grad()
def student_features(student: Student, urls: list[str], batch_size: int, workers: int = 0):
    """Frozen student features and labels of the eval view of every image: (N, D), (N,)."""
    device = next(student.parameters()).device
    feats, labels = [], []
    for batch in eval_pipeline(urls, student.data_config, batch_size, workers):
        feats.append(student.features(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def probe_score(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                where: str) -> dict[str, float]:
    """Top-1/top-5 (percent) on labeled ``val`` (features, labels) of a linear probe fitted on labeled ``train``."""
    (train_x, train_y), (val_x, val_y) = train, val
    keep_train, keep_val = _labeled(train_y, where), _labeled(val_y, where)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    probe = fit_probe(train_x[keep_train], train_y[keep_train], num_classes)
    return _as_percent(topk_hits(probe_logits(probe, val_x[keep_val]), val_y[keep_val]), int(keep_val.sum()))


def _labeled(labels: torch.Tensor, where: str) -> torch.Tensor:
    keep = labels >= 0
    if not keep.any():
        raise GenddError(f"{where}: no labeled samples to score (every label is -1)")
    return keep


@torch.no_grad()
def evaluate(method: Method, val_urls: list[str], batch_size: int = 128, samples: int = 1,
             sampling: dict | None = None, probe_urls: list[str] | None = None, workers: int = 0) -> dict:
    """Top-1/top-5 (percent) of every predictor of ``method`` on ``val_urls``.

    Args:
        samples: gendd: sampled features averaged per image.
        sampling: gendd: overrides of the head's ``steps``, ``cfg``, ``temperature``, ``sampler``.
        probe_urls: train shards to fit a linear probe on; None skips the probe.
    """
    was_training = method.training
    method.eval()
    device = next(method.parameters()).device
    hits: dict[str, dict[str, int]] = {}
    val_x, val_y = [], []  # labeled val features, kept for the probe
    n, start = 0, time.perf_counter()
    for batch in eval_pipeline(val_urls, method.student.data_config, batch_size, workers):
        labels = batch["label"].to(device)
        keep = labels >= 0
        if not keep.any():
            continue
        features = method.student.features(batch["image"].to(device)[keep])
        for name, logits in method.predict(features, samples, **(sampling or {})).items():
            for k, v in topk_hits(logits, labels[keep]).items():
                hits.setdefault(name, {}).setdefault(k, 0)
                hits[name][k] += v
        if probe_urls:
            val_x.append(features.float().cpu())
            val_y.append(labels[keep].cpu())
        n += int(keep.sum())
    if n == 0:
        raise GenddError(f"{val_urls[0]}: no labeled val samples to score (every label is -1)")
    result = {name: _as_percent(h, n) for name, h in hits.items()}
    result["images"], result["seconds"] = n, time.perf_counter() - start
    if probe_urls:
        train = student_features(method.student, probe_urls, batch_size, workers)
        result["probe"] = probe_score(train, (torch.cat(val_x), torch.cat(val_y)), probe_urls[0])
    method.train(was_training)
    return result


def evaluate_checkpoint(path: str, val_shards: list[str], train_shards: list[str] | None = None,
                        batch_size: int = 128, samples: int = 1, sampling: dict | None = None,
                        input_size: int | None = None, workers: int = 0) -> dict:
    """Score a saved student on val shards (and, with ``train_shards``, its linear probe)."""
    method, ckpt = load_method(path)
    trained = method.student.input_hw
    if input_size is not None and (input_size, input_size) != tuple(trained):
        raise GenddError(f"{path}: the student was trained at input {trained[0]}x{trained[1]}, not {input_size}")
    result = evaluate(method, expand_urls(val_shards), batch_size, samples, sampling,
                      expand_urls(train_shards) if train_shards else None, workers)
    return {"checkpoint": path, "method": ckpt["config"]["method"], "epoch": ckpt["epoch"],
            "samples": samples, "sampling": sampling or {}, **result}


def store_features(store: FeatureStore, urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's cached eval-view (view 0) features and labels of the shards ``urls``: (N, D), (N,)."""
    feats, labels = [], []
    for name in check_shards(store, urls):
        group = store.shard(name)
        feats.append(torch.from_numpy(group["features"][:, 0].astype(np.float32)))
        labels.append(torch.from_numpy(group["labels"][...].astype(np.int64)))
    return torch.cat(feats), torch.cat(labels)


def reference_probes(store_url: str, train_shards: list[str], val_shards: list[str], student: StudentConfig,
                     seed: int = 0, batch_size: int = 128) -> dict[str, dict[str, float]]:
    """The probes an unsupervised student is read beside: the teacher's cached features, and a randomly
    initialised ``student`` (seeded) that saw no data."""
    store = FeatureStore.open(store_url)
    train, val = expand_urls(train_shards), expand_urls(val_shards)
    result = {"teacher features": probe_score(store_features(store, train), store_features(store, val), train[0])}
    torch.manual_seed(seed)
    model = create_student(student, store.manifest["teacher"]["num_classes"]).eval()
    result["random-init student"] = probe_score(student_features(model, train, batch_size),
                                                student_features(model, val, batch_size), train[0])
    return result
