"""Fine-tuning a teacher on labeled shards, before it is run once by extract.

`finetune` builds the teacher that a `TeacherConfig` names (for the embedded
default, the ImageNet EfficientNet-Lite0 a package ships), replaces its
classifier with one sized to the shards' classes, and trains the whole network
with cross-entropy (label smoothing), AdamW and a per-step cosine schedule on
random-resized crops at the teacher's input size. Each epoch ends with a
validation pass and an atomic checkpoint (``last.safetensors``, removed once the
fine-tune is done), so a killed run resumes. The result is ``model.safetensors``, a plain state dict that extract
loads with ``weights: PATH``, and ``metrics.json`` with its val accuracy.

``epochs: 0`` keeps the teacher as it ships (an ImageNet teacher for ImageNet
shards, or one whose labels are not the shards'): the weights are written
unchanged and the val accuracy is measured only where the labels fit its classifier.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file
from timm.scheduler import CosineLRScheduler

from gendd_pipe import seeds
from gendd_pipe.config import (NonNegativeFloat, NonNegativeInt, OutputDir, PositiveFloat, PositiveInt, Shards,
                               configclass, differences, narrow, to_dict)
from gendd_pipe.data.streams import augmented_pipeline, epoch_steps, eval_pipeline
from gendd_pipe.data.shards import expand_urls, shard_labels
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.distill.checkpoint import read_checkpoint, save_checkpoint
from gendd_pipe.errors import GenddError
from gendd_pipe.files import write_yaml
from gendd_pipe.layout import LAST, METRICS, MODEL, checkpoint_in, config_beside
from gendd_pipe.metrics import EpochLog, topk_hits
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.progress import StepBar
from gendd_pipe.runtime import (RuntimeConfig, autocast, compiled, fast_math, grad_scaler, network_input, place,
                               precision_change, resolve_device)

FORMAT = "gendd-pipe/teacher-1"
log = logging.getLogger(__name__)


@configclass
class FinetuneConfig:
    """How a teacher is fine-tuned on the train shards."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ViewConfig = field(default_factory=ViewConfig)  # crop and flip ranges of the training crops; seed
    num_classes: Annotated[int, Field(ge=2)] | None = None  # None: one more than the largest train label
    epochs: NonNegativeInt = 2  # 0: keep the teacher as it ships (classifier included)
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3  # AdamW peak learning rate (the new classifier and the pretrained body alike)
    min_lr: NonNegativeFloat = 1e-6
    warmup_steps: NonNegativeInt = 20  # linear warmup from lr / 100
    weight_decay: NonNegativeFloat = 1e-2
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shuffle_buffer: PositiveInt = 1000
    num_workers: NonNegativeInt | None = None  # DataLoader worker processes; None: sized to the cores
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device and precision (a resume may change them)


@torch.no_grad()
def accuracy(model: torch.nn.Module, urls: list[str], data_config: dict, batch_size: int,
             num_workers: int | None = None, runtime: RuntimeConfig = RuntimeConfig()) -> dict | None:
    """Top-1/top-5 (percent) of a classifier on the eval view of every labeled image; None when the shards have
    no labels or labels beyond the classifier (a teacher whose classes are not the shards')."""
    was_training = model.training
    model.eval()
    hits, n, device = {}, 0, resolve_device(runtime)
    for batch in eval_pipeline(urls, data_config, batch_size, num_workers, device.type == "cuda"):
        keep = batch["label"] >= 0
        images = network_input(batch["image"], data_config, runtime, device)  # the pinned batch, copied once
        with autocast(runtime, device):
            logits = model(images if keep.all() else images[keep.to(device)]).float().cpu()
        if (batch["label"][keep] >= logits.shape[1]).any():
            n = 0
            break
        for k, v in topk_hits(logits, batch["label"][keep]).items():
            hits[k] = hits.get(k, 0) + v
        n += int(keep.sum())
    model.train(was_training)
    return {k: 100.0 * v / n for k, v in hits.items()} if n else None


def _upgrade(record: dict) -> dict:
    """A fine-tune config recorded by an earlier version, in today's keys."""
    return {("num_workers" if k == "workers" else k): v for k, v in record.items()}


def _differences(cfg: FinetuneConfig, record: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings where a checkpoint's recorded config and ``cfg`` disagree so that it cannot continue as ``cfg``:
    every key but the runtime's placement (device, channels_last, compile, tf32), which a resume may change."""
    record = _upgrade(record)
    return differences(to_dict(cfg), record, ignore=(*ignore, "runtime")) + precision_change(record, cfg.runtime)


def _resume(out: str, cfg: FinetuneConfig, model, optimizer, scheduler, scaler, resume: bool) -> tuple[int, list]:
    path = checkpoint_in(out, LAST)
    if not os.path.exists(path):
        return 0, []
    if not resume:
        raise GenddError(f"{out}: holds a fine-tune already ({LAST}); pass --resume to continue it or choose another --out")
    ckpt = read_checkpoint(path, FORMAT)
    differ = _differences(cfg, ckpt["config"], ignore=("epochs",))
    if differ:
        raise GenddError(f"{path}: was trained with other settings ({', '.join(differ)}); resume it with the same "
                         "settings or use another --out")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):  # an fp16 fine-tune's loss scale goes on where it was
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["history"]


def finetune(shards: list[str], val_shards: list[str], out: str, cfg: FinetuneConfig, resume: bool = False,
             progress: bool = True) -> dict:
    """Fine-tune the teacher; writes ``model.safetensors`` and ``metrics.json`` to ``out`` and returns the metrics."""
    urls, val_urls = expand_urls(shards), expand_urls(val_shards)
    torch.manual_seed(cfg.views.seed)
    teacher = create_teacher(cfg.teacher, cfg.runtime)
    model, data_config, runtime, device = teacher.model, teacher.data_config, cfg.runtime, teacher.device
    fast_math(runtime, device)
    if cfg.epochs == 0:
        val = accuracy(model, val_urls, data_config, cfg.batch_size, cfg.num_workers, runtime)
        return _write(out, cfg, model, None, [{"epoch": 0, "val": val}])
    counts, _, top = shard_labels(urls)
    count = sum(counts.values())
    num_classes = cfg.num_classes or top + 1
    if num_classes < 2:
        raise GenddError(f"{urls[0]}: the train shards carry no labels (cls); a teacher cannot be fine-tuned on them")
    steps, _ = epoch_steps(count, cfg.batch_size, 1)
    model.reset_classifier(num_classes)
    place(model.train(), runtime, device)  # the new classifier too
    forward = compiled(model, runtime)
    scaler = grad_scaler(runtime, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps * cfg.epochs
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=cfg.min_lr, warmup_t=cfg.warmup_steps,
                                  warmup_lr_init=cfg.lr / 100, t_in_epochs=False)
    start, history = _resume(out, cfg, model, optimizer, scheduler, scaler, resume)
    epochs = EpochLog(out, keep_through=start)
    loader = augmented_pipeline(urls, counts, data_config, cfg.views, cfg.batch_size, start, cfg.shuffle_buffer,
                                cfg.num_workers, device.type == "cuda")

    for epoch in range(start, cfg.epochs):
        loader.dataset.set_epoch(epoch)
        batches = iter(loader)  # before seeding: starting an iterator draws from torch's generator
        torch.manual_seed(seeds.torch_seed(cfg.views.seed, epoch))
        loss_sum, begin = 0.0, time.perf_counter()
        with StepBar(f"teacher epoch {epoch + 1}/{cfg.epochs}", steps, progress) as bar:
            for i, batch in enumerate(itertools.islice(batches, steps)):
                images = network_input(batch["image"], data_config, runtime, device)
                labels = batch["label"].to(device, non_blocking=True)
                with autocast(runtime, device):
                    logits = forward(images)
                loss = F.cross_entropy(logits.float(), labels, ignore_index=-1, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step_update(epoch * steps + i + 1)
                loss_sum += loss.detach()
                bar.step(loss.detach())
        seconds = time.perf_counter() - begin
        val = accuracy(model, val_urls, data_config, cfg.batch_size, cfg.num_workers, runtime)
        if val is None:
            raise GenddError(f"{val_urls[0]}: no val labels the fine-tuned classifier can score")
        history.append({"epoch": epoch + 1, "loss": float(loss_sum) / steps,
                        "images_per_s": steps * cfg.batch_size / seconds,
                        "val": val})
        epochs.append(history[-1])
        log.info("teacher epoch %d/%d: loss %.4f, val top-1 %.2f, %.0f images/s", epoch + 1, cfg.epochs,
                 history[-1]["loss"], val["top1"], history[-1]["images_per_s"])
        save_checkpoint(os.path.join(out, LAST), {
            "config": to_dict(cfg), "epoch": epoch + 1, "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "history": history}, FORMAT)

    epochs.close()
    metrics = _write(out, cfg, model, count, history)
    os.remove(os.path.join(out, LAST))  # kept only while a fine-tune can still be resumed
    return metrics


def _write(out: str, cfg: FinetuneConfig, model: torch.nn.Module, count: int | None, history: list[dict]) -> dict:
    """The fine-tune's outputs: ``model.safetensors`` and ``metrics.json`` (returned)."""
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, MODEL))
    metrics = {"model": os.path.join(out, MODEL), "teacher": cfg.teacher.name, "from_weights": cfg.teacher.weights,
               "epochs": cfg.epochs, "num_classes": model.num_classes, "train_samples": count,
               "val": history[-1]["val"], "history": history}
    with open(os.path.join(out, METRICS), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


@configclass(kw_only=True)
class TeacherStage(FinetuneConfig):
    """Stage ``teacher``: the fine-tune and where it reads and writes."""

    shards: Shards  # labeled train shards
    val_shards: Shards  # labeled val shards
    out: OutputDir  # model.safetensors, metrics.json, metrics.csv, config.yaml (and last.safetensors while it runs)


def run_stage(cfg: TeacherStage, resume: bool | None = None, progress: bool = True) -> dict:
    """Fine-tune into ``cfg.out``.

    Args:
        resume: True continues the fine-tune in ``out``, False refuses one in progress there, None (a DVC stage)
            resumes one of the same settings and otherwise starts afresh.
    """
    core = narrow(cfg, FinetuneConfig)
    last = checkpoint_in(cfg.out, LAST)
    if resume is None:
        resume = os.path.exists(last) and not _differences(core, read_checkpoint(last, FORMAT)["config"])
        if os.path.exists(last) and not resume:
            log.info("%s: a fine-tune with other settings; starting afresh", last)
            os.remove(last)
    metrics = finetune(list(cfg.shards), list(cfg.val_shards), cfg.out, core, resume=resume, progress=progress)
    write_yaml(config_beside(cfg.out), to_dict(cfg))
    return metrics
