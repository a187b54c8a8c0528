"""The distill loop: a student trained from a feature store, without the teacher (or beside a live one).

`distill` checks the store (or the live teacher, `gendd_pipe.distill.live`) against the shards and the
method, builds the student and method, and trains it phase by phase (`Phase`: one, or GenDD's stage 1 then
stage 2), each phase with a fresh AdamW (beta2 ramped as the official GenDD code
does) and its own per-step schedule with linear warmup (timm's
`CosineLRScheduler` or `MultiStepLRScheduler`), one checkpoint per epoch
(``last.safetensors``, recording its phase, plus ``best.safetensors`` when the
primary predictor improves in a phase that selects the best) and one JSON line of
metrics per epoch (``metrics.jsonl``). ``resume`` continues a killed run from
``last.safetensors`` in the phase it was killed in; each
epoch seeds its own randomness from (seed, epoch), so a resumed run replays the
epochs an uninterrupted one would have run. Under torchrun the method is
wrapped in DDP, ``batch_size`` is the global batch (each rank takes its share),
every rank runs the same steps over its part of the epoch and scores its part of
the val shards, and rank 0 writes.

The ``runtime`` section places the run: device, autocast (bf16 or fp16, with a
gradient scaler for fp16; the losses in float32), channels_last and
torch.compile. A checkpoint resumes on any device but only under the precision
it was trained in.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.utils import distribute_bn

from gendd_pipe import seeds
from gendd_pipe.config import differences
from gendd_pipe.distill.config import upgrade
from gendd_pipe.data.loader import check_shards, train_pipeline
from gendd_pipe.data.streams import epoch_steps
from gendd_pipe.data.shards import expand_urls, shard_name
from gendd_pipe.distill.checkpoint import load_state, read_checkpoint, save_checkpoint
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.evaluate import evaluate
from gendd_pipe.distill.live import LiveTeacher
from gendd_pipe.distill.methods import Phase, TeacherHead, create_method, get_method
from gendd_pipe.distill.stage1 import cache_path, read_stage1, restore_stage1, save_stage1, stage1_key
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.models.student import create_student
from gendd_pipe.progress import StepBar
from gendd_pipe.layout import BEST, LAST, SUMMARY, checkpoint_in
from gendd_pipe.metrics import EpochLog, read_epochs
from gendd_pipe.runtime import (RuntimeConfig, autocast, compiled, fast_math, grad_scaler, network_input, place,
                                precision_change, rank_device)
from gendd_pipe.store.format import is_mixed_store
from gendd_pipe.store.reader import FeatureStore

log = logging.getLogger(__name__)


def check_mixed(manifest: dict, cfg: DistillConfig, where: str) -> None:
    """Refuse a method that needs one target class per sample on views that are mixed."""
    if not cfg.unsupervised and is_mixed_store(manifest) and not get_method(cfg.method).mixed_labels:
        raise GenddError(f"{where}: its views are mixed, so their labels are two classes mixed; method "
                         f"{cfg.method} needs one target class per sample (use kd, gdkd, gendd or ce, or views "
                         "without augment.mixup and augment.cutmix)")


def check_method(store: FeatureStore, cfg: DistillConfig, counts: dict[str, int]) -> None:
    """Refuse a method the store cannot feed: top-k logits where it needs full ones, or missing labels."""
    if get_method(cfg.method).needs_logits and store.logits_mode not in ("full", "derived"):
        raise GenddError(f"{store.url}: method {cfg.method} needs full teacher logits but the store keeps "
                         f"{store.logits_mode} logits (re-extract with logits: derived or full, or use another "
                         "method)")
    if cfg.unsupervised:
        return
    check_mixed(store.manifest, cfg, store.url)
    num_classes = store.manifest["teacher"]["num_classes"]
    for name in counts:
        labels = store.shard(name)["labels"][...]
        if (labels < 0).any():
            raise GenddError(f"{store.url}: shard {name} has unlabeled samples (label -1); "
                             f"method {cfg.method} is supervised (pass --unsupervised)")
        if labels.max() >= num_classes:
            raise GenddError(f"{store.url}: shard {name} has label {labels.max()} but the teacher has "
                             f"{num_classes} classes")


def teacher_head(store: FeatureStore, first_shard: str) -> TeacherHead:
    weight, bias = store.head()
    features = store.view_features(first_shard, 0)  # view 0 of the first shard
    return TeacherHead(torch.from_numpy(weight), torch.from_numpy(bias), float(np.linalg.norm(features, axis=1).mean()))


def join_world(runtime: RuntimeConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins the torchrun process group when there is one: gloo for a CPU
    device, and for a CUDA device NCCL bound to it (``device_id``; gloo beside it for CPU tensors and objects)."""
    device = rank_device(runtime)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives and the current device are this rank's GPU
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def on_rank0(decide, runtime: RuntimeConfig):
    """``decide()`` run by rank 0 alone (it may read and change files only rank 0 sees, as on a node-local disk),
    its result (or its `GenddError`) given to every torchrun rank."""
    rank, world, _ = join_world(runtime)
    result = [None, None]
    if rank == 0:
        try:
            result[0] = decide()
        except GenddError as exc:  # every rank stops with the one line, none waits for the others
            result[1] = str(exc)
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise GenddError(result[1])
    return result[0]


def run_differences(cfg: DistillConfig, record: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings where a checkpoint's recorded config and ``cfg`` disagree so that it cannot continue as
    ``cfg``: every key but the runtime's placement (device, channels_last, compile), which a resume may change."""
    record = upgrade(record)
    return differences(cfg.to_dict(), record, ignore=(*ignore, "runtime")) + precision_change(record, cfg.runtime)


def _resume(out: str, cfg: DistillConfig, resume: bool, world: int) -> dict | None:
    """The last checkpoint of the run in ``out`` when resuming it (None for a fresh run), refusing one that
    cannot continue as ``cfg``. Rank 0 reads it and gives it to every rank: nothing depends on a file that only
    rank 0 wrote, so nodes without a shared filesystem resume alike."""
    path = checkpoint_in(out, LAST)
    if not os.path.exists(path):
        return None
    if not resume:
        raise GenddError(f"{out}: holds a run already ({LAST}); pass --resume to continue it or choose another --out")
    ckpt = read_checkpoint(path)
    differ = run_differences(cfg, ckpt["config"], ignore=("epochs",))
    if differ:
        raise GenddError(f"{path}: was trained with other settings ({', '.join(differ)}); resume it with the "
                         "same settings or use another --out")
    trained = ckpt.get("distributed", {}).get("world_size", 1)
    if trained != world:
        raise GenddError(f"{path}: was trained on {trained} rank(s), not {world}; resume it with "
                         f"--nproc-per-node {trained} (the epochs' split depends on the world size)")
    return ckpt


def _beta2(beta2: tuple[float, float], step: int, total: int) -> float:
    """AdamW's beta2 at ``step`` of ``total``: from the first value to the second on a half cosine, as the official
    ``beta2_schedule_cos`` (step / (total - 1))."""
    low, high = beta2
    return high - 0.5 * (high - low) * (1 + math.cos(math.pi * step / max(total - 1, 1)))


def phase_optimizer(method, phase: Phase, steps: int):
    """A phase's fresh AdamW and its per-step schedule (timm's): a linear warmup from lr / 100 over
    ``warmup_epochs``, then a cosine to ``min_lr`` over the rest of the phase, or steps of ``decay_rate`` at each of
    ``decay_epochs`` (counted from the phase's start, warmup included)."""
    groups = method.param_groups(phase.weight_decay, phase.name)
    trained = {id(p) for group in groups for p in group["params"]}
    for p in method.parameters():  # what the phase does not train stays out of autograd (and of DDP)
        p.requires_grad_(id(p) in trained)
    optimizer = torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, phase.beta2[0]))
    warmup = steps * phase.warmup_epochs
    common = dict(warmup_t=warmup, warmup_lr_init=phase.lr / 100, t_in_epochs=False)
    if phase.schedule == "step":
        # timm applies a milestone m from step m - 1 (its convention): + 1 makes epoch e's first step the first dropped
        scheduler = MultiStepLRScheduler(optimizer, decay_t=[steps * e + 1 for e in phase.decay_epochs],
                                         decay_rate=phase.decay_rate, warmup_prefix=False, **common)
    else:
        scheduler = CosineLRScheduler(optimizer, t_initial=max(steps * phase.epochs - warmup, 1), lr_min=phase.min_lr,
                                      warmup_prefix=True, **common)
    return optimizer, scheduler


def distill(store_url: str | None, shards: list[str], val_shards: list[str], out: str, cfg: DistillConfig,
            resume: bool = False, progress: bool = True, stage1_cache: str | None = None) -> dict:
    """Train a student from the store, or from the live teacher ``cfg.teacher`` names (``store_url`` None);
    returns the summary (best and last epoch) also written to ``out``.

    Args:
        stage1_cache: a directory of finished GenDD stage-1 phases (`gendd_pipe.distill.stage1`): a run starts
            stage 2 from one trained with the same stage-1 settings, or trains stage 1 and keeps it there.
    """
    if store_url and cfg.teacher:
        raise GenddError(f"{public_url(store_url)}: the run names both a store and a live teacher "
                         f"({cfg.teacher.name}); its teacher outputs come from one of them: drop the store or teacher")
    if not store_url and not cfg.teacher:
        raise GenddError("the run names no store and no live teacher: set distill.store (--store) or a run's teacher")
    urls, val_urls = expand_urls(shards), expand_urls(val_shards)
    runtime = cfg.runtime
    rank, world, device = join_world(runtime)
    fast_math(runtime, device)
    if cfg.teacher is None:
        store, live = FeatureStore.open(store_url), None
        counts = check_shards(store, urls)
        check_method(store, cfg, counts)
        manifest, head = store.manifest, teacher_head(store, shard_name(urls[0]))
        pipeline = partial(train_pipeline, urls, store)
    else:
        live = LiveTeacher(cfg.teacher, runtime, device)
        counts = on_rank0(lambda: live.check(urls, cfg.unsupervised), runtime)  # one read of the shards' labels
        check_mixed(live.manifest, cfg, live.name)
        manifest, head = live.manifest, live.head(urls[0], cfg.loader.batch_size)
        pipeline = partial(live.pipeline, urls)

    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student, manifest["teacher"]["num_classes"])
    method = place(create_method(cfg, student, head), runtime, device)
    derived = derived_head(head, cfg.method, device)
    steps, per_rank = epoch_steps(sum(counts.values()), cfg.loader.batch_size, world)
    ckpt = on_rank0(lambda: _resume(out, cfg, resume, world), runtime)  # every rank holds rank 0's checkpoint
    start_epoch, best = (ckpt["epoch"], ckpt["best"]) if ckpt else (0, {"top1": -1.0, "epoch": 0})
    if ckpt:
        load_state(method, ckpt["state_dict"], checkpoint_in(out, LAST))
    phases = get_method(cfg.method).phases(cfg)
    shared, cached = None, []
    if stage1_cache and phases[0].name == "stage1":
        key = stage1_key(cfg, phases[0], manifest, urls, counts, val_urls, world)
        shared = cache_path(stage1_cache, key)
        kept = on_rank0(lambda: read_stage1(shared), runtime) if start_epoch == 0 else None
        if kept:
            start_epoch = phases[0].epochs
            cached = restore_stage1(kept, method, shared)
    record = {"distributed": {"world_size": world, "rank_batch": per_rank, "batch_size": cfg.loader.batch_size},
              "store": public_url(store_url) if store_url else None, "shards": [public_url(u) for u in urls],
              "val_shards": [public_url(u) for u in val_urls],
              "teacher": {**manifest["teacher"], "head_shape": list(head.weight.shape),
                          "feature_norm": head.feature_norm, "preprocessing": manifest["preprocessing"]}}
    epochs = EpochLog(out, keep_through=start_epoch) if rank == 0 else None  # drops epochs past the checkpoint
    for line in cached if epochs else ():  # a stage 1 from the cache: its epochs as this run's
        epochs.append(line)
    primary = "probe" if cfg.with_probe and cfg.unsupervised else method.primary

    end = 0
    for phase in phases:
        first, end = end, end + phase.epochs  # the phase's epochs: [first, end)
        if start_epoch >= end:
            continue
        optimizer, scheduler = phase_optimizer(method, phase, steps)
        model = compiled(_data_parallel(method, device) if world > 1 else method, runtime)
        scaler = grad_scaler(runtime, device)  # fresh each phase, as the optimizer
        if start_epoch > first:  # killed inside this phase: its optimizer, schedule and scaler go on
            if ckpt.get("phase", "train") != phase.name:
                raise GenddError(f"{checkpoint_in(out, LAST)}: was saved in phase {ckpt.get('phase', 'train')!r}, "
                                 f"not {phase.name!r} where epoch {start_epoch} falls; its settings differ")
            optimizer.load_state_dict(ckpt["optimizer"])  # moved to the parameters' device, wherever it was saved
            scheduler.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        loader = pipeline(student.data_config, cfg.loader, cfg.seed, max(first, start_epoch), counts,
                          cuda=device.type == "cuda", soft_labels=not cfg.unsupervised,
                          fresh_scale=phase.fresh_scale)  # every epoch of the phase
        total = steps * phase.epochs
        for epoch in range(max(first, start_epoch), end):
            loader.dataset.set_epoch(epoch)
            batches = iter(loader)  # before seeding: starting an iterator draws from torch's generator
            torch.manual_seed(seeds.torch_seed(cfg.seed, epoch, rank))
            sums: dict[str, torch.Tensor] = {}
            begin = time.perf_counter()
            title = f"epoch {epoch + 1}/{cfg.epochs} {cfg.method}" + (f" {phase.name}" if len(phases) > 1 else "")
            with StepBar(title, steps, progress and rank == 0) as bar:
                for i, batch in enumerate(itertools.islice(batches, steps)):
                    step = (epoch - first) * steps + i  # of the phase
                    batch = _on_device(batch, student.data_config, runtime, device, derived, live)
                    with autocast(runtime, device):
                        losses = model(batch, epoch)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(losses["loss"]).backward()
                    for group in optimizer.param_groups:
                        group["betas"] = (group["betas"][0], _beta2(phase.beta2, step, total))
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step_update(step + 1)
                    for k, v in losses.items():  # summed where they are: no host sync per step
                        sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
                    bar.step(losses["loss"].detach())
            seconds = time.perf_counter() - begin
            del batches
            if world > 1:  # each rank's steps moved its own BatchNorm statistics: score rank 0's, which it saves
                distribute_bn(method, world, reduce=False)
            val = evaluate(method, val_urls, cfg.loader.batch_size, probe_urls=urls if cfg.with_probe else None,
                           num_workers=cfg.loader.num_workers, runtime=runtime)  # each rank its share; all the totals
            if rank != 0:
                continue
            line = {"epoch": epoch + 1, "phase": phase.name, "lr": optimizer.param_groups[0]["lr"],
                    "train": {k: float(v) / steps for k, v in sums.items()},
                    "images_per_s": steps * cfg.loader.batch_size / seconds, "train_seconds": seconds, "val": val}
            epochs.append(line)
            log.info("epoch %d/%d %s: loss %.4f, val top-1 %s, %.0f images/s", epoch + 1, cfg.epochs, cfg.method,
                     line["train"]["loss"],
                     ", ".join(f"{k} {v['top1']:.2f}" for k, v in val.items() if isinstance(v, dict)),
                     line["images_per_s"])
            improved = phase.selects_best and val[primary]["top1"] > best["top1"]
            if improved:
                best = {"top1": val[primary]["top1"], "epoch": epoch + 1}
            save_checkpoint(os.path.join(out, LAST), {
                "config": cfg.to_dict(), "epoch": epoch + 1, "phase": phase.name, "state_dict": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "best": best, **record})
            if improved:
                shutil.copyfile(os.path.join(out, LAST), os.path.join(out, BEST))
        del loader, model  # the loader's persistent workers end with it
        if shared and phase.name == "stage1" and rank == 0 and not os.path.exists(shared):
            save_stage1(shared, method.stage1_state(), [m for m in epochs.records if m["phase"] == "stage1"])
    if epochs:
        epochs.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    chosen = [p.name for p in phases if p.selects_best]
    return summarize(out, primary, chosen) if rank == 0 else {}


def _on_device(batch: dict, data_config: dict, runtime, device: torch.device,
               head: tuple[torch.Tensor, torch.Tensor] | None = None, live: LiveTeacher | None = None) -> dict:
    """A loader's batch on ``device``: pixels normalized there, the other tensors copied without blocking; with
    ``live``, the live teacher's outputs of the batch's ``teacher_image``; and with ``head`` (the teacher's
    classifier on ``device``) the teacher logits of a batch that has features alone (a store of derived logits,
    a live teacher of a linear classifier), ``feature @ W.T + b`` in one matmul."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in ("image", "teacher_image") else v
             for k, v in batch.items() if k != "teacher_image"}
    moved["image"] = network_input(batch["image"], data_config, runtime, device)  # one copy, as uint8
    if live is not None and "teacher_image" in batch:
        moved.update(live.outputs(batch["teacher_image"]))  # copied as uint8, normalized on the device
    if head is not None and "logits" not in moved:
        moved["logits"] = torch.addmm(head[1], moved["feature"], head[0].T)  # (B, C) float32
    return moved


def derived_head(head: TeacherHead, method_name: str, device: torch.device):
    """The teacher classifier on ``device`` when the method reads teacher logits, for the batches whose store
    gives features alone (mode derived: `_on_device` makes their logits per batch); None otherwise."""
    if not get_method(method_name).needs_logits:
        return None
    return head.weight.to(device), head.bias.to(device)


def _data_parallel(method, device: torch.device) -> torch.nn.Module:
    """``method`` in DDP for a phase: the parameters the phase trains (`phase_optimizer` left the others out of
    autograd), unused ones searched for only where the method leaves some out of its loss, and no buffer
    broadcast per step (the teacher's are constant; BatchNorm's are made rank 0's at each epoch's end)."""
    return torch.nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=method.unused_parameters)


def summarize(out: str, primary: str, phases: list[str] | None = None) -> dict:
    """Best and last epoch of a run from its metrics, written to ``summary.json``; the best among the epochs of
    ``phases`` (None: every epoch)."""
    lines = read_epochs(out)
    pool = [m for m in lines if phases is None or m.get("phase", "train") in phases] or lines
    best = max(pool, key=lambda m: m["val"][primary]["top1"])
    pick = lambda m: {"epoch": m["epoch"], **{k: v for k, v in m["val"].items() if isinstance(v, dict)}}  # noqa: E731
    summary = {"primary": primary, "best": pick(best), "last": pick(lines[-1]),
               "images_per_s": sum(m["images_per_s"] for m in lines) / len(lines), "epochs": len(lines)}
    with open(os.path.join(out, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
