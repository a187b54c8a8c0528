"""Linear probes: how linearly separable frozen features are (the unsupervised metric).

Features of the train images (eval view) are standardized and a multinomial
logistic regression is fitted by full-batch L-BFGS with a small L2 penalty;
val accuracy is then read from the fitted probe. Deterministic for given features.
`reference_probes` (stage ``probes``) gives the probes an unsupervised student is
read beside: the teacher's cached features and a randomly initialised student.
"""

from __future__ import annotations

from dataclasses import field

import numpy as np
import torch
import torch.nn.functional as F

from gendd_pipe.config import NonNegativeInt, OutputFile, PositiveInt, Shards, configclass, to_dict
from gendd_pipe.data.loader import check_shards
from gendd_pipe.data.streams import eval_pipeline
from gendd_pipe.data.shards import expand_urls
from gendd_pipe.errors import GenddError
from gendd_pipe.files import write_json, write_yaml
from gendd_pipe.layout import config_beside
from gendd_pipe.metrics import as_percent, topk_hits
from gendd_pipe.models.student import Student, StudentConfig, create_student
from gendd_pipe.runtime import RuntimeConfig, autocast, compiled, network_input, place, resolve_device
from gendd_pipe.store.reader import FeatureStore


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-4,
              iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a probe on (N, D) features, on their device; returns (mean, std, weight (C, D), bias (C,))."""
    features, labels = features.double(), labels.to(features.device)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, weight.detach(), bias.detach()


def probe_logits(probe: tuple, features: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) of a fitted probe on new features (N, D)."""
    mean, std, weight, bias = probe
    return ((features.double() - mean) / std) @ weight.T + bias


def _labeled(labels: torch.Tensor, where: str) -> torch.Tensor:
    keep = labels >= 0
    if not keep.any():
        raise GenddError(f"{where}: no labeled samples to score (every label is -1)")
    return keep


def probe_score(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                where: str, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1/top-5 (percent) on labeled ``val`` (features, labels) of a linear probe fitted on labeled ``train``,
    on ``device`` (in float64; a GPU's full-batch L-BFGS takes seconds where the CPU takes minutes)."""
    (train_x, train_y), (val_x, val_y) = train, val
    keep_train, keep_val = _labeled(train_y, where), _labeled(val_y, where)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    probe = fit_probe(train_x[keep_train].to(device), train_y[keep_train], num_classes)
    logits = probe_logits(probe, val_x[keep_val].to(device)).cpu()
    return as_percent(topk_hits(logits, val_y[keep_val]), int(keep_val.sum()))


@torch.no_grad()
def student_features(student: Student, urls: list[str], batch_size: int, num_workers: int | None = None,
                     runtime: RuntimeConfig = RuntimeConfig()):
    """Frozen student features and labels of the eval view of every image (under torchrun, this rank's share):
    (N, D), (N,)."""
    device, encode = next(student.parameters()).device, compiled(student.features, runtime)
    feats, labels = [], []
    for batch in eval_pipeline(urls, student.data_config, batch_size, num_workers, device.type == "cuda"):
        with autocast(runtime, device):
            feats.append(encode(network_input(batch["image"], student.data_config, runtime, device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def store_features(store: FeatureStore, urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's cached eval-view (view 0) features and labels of the shards ``urls``: (N, D), (N,)."""
    feats, labels = [], []
    for name in check_shards(store, urls):
        feats.append(torch.from_numpy(store.view_features(name, 0)))
        labels.append(torch.from_numpy(store.shard(name)["labels"][...].astype(np.int64)))
    return torch.cat(feats), torch.cat(labels)


def reference_probes(store_url: str, train_shards: list[str], val_shards: list[str], student: StudentConfig,
                     seed: int = 0, batch_size: int = 128,
                     runtime: RuntimeConfig = RuntimeConfig()) -> dict[str, dict[str, float]]:
    """The probes an unsupervised student is read beside: the teacher's cached features, and a randomly
    initialised ``student`` (seeded) that saw no data, run on ``runtime``'s device."""
    device = resolve_device(runtime)
    store = FeatureStore.open(store_url)
    train, val = expand_urls(train_shards), expand_urls(val_shards)
    result = {"teacher features": probe_score(store_features(store, train), store_features(store, val), train[0])}
    torch.manual_seed(seed)
    model = place(create_student(student, store.manifest["teacher"]["num_classes"]).eval(), runtime, device)
    result["random-init student"] = probe_score(student_features(model, train, batch_size, runtime=runtime),
                                                student_features(model, val, batch_size, runtime=runtime), train[0])
    return result


@configclass(kw_only=True)
class ProbesStage:
    """Stage ``probes``: the reference probes of an unsupervised recipe."""

    store: str  # the feature store (path or URL)
    shards: Shards  # train shards: the probes are fitted on them
    val_shards: Shards  # the probes are read on them
    student: StudentConfig  # the student of the recipe, probed at random init
    seed: NonNegativeInt = 0  # the random init
    batch_size: PositiveInt = 128
    out: OutputFile  # the JSON of the probes
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # where the student runs


def run_stage(cfg: ProbesStage) -> dict:
    """Write the reference probes (``cfg.out``) and the config beside them."""
    result = reference_probes(cfg.store, list(cfg.shards), list(cfg.val_shards), cfg.student, cfg.seed,
                              cfg.batch_size, cfg.runtime)
    write_yaml(config_beside(cfg.out, is_dir=False), to_dict(cfg))
    write_json(cfg.out, result)
    return result
