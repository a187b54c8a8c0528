"""GenDD's stage 1 trained once for every run that would train it alike: a cache keyed by what determines it.

A stage-1 phase depends on the store's teacher and views, the image shards, the
student, the seed, the loader's batch, shuffle and label smoothing, the
precision, the world size and the phase's own settings (epochs, lr, min_lr,
weight decay, crop scale), and on nothing of stage 2 (the head, smooth, centers,
the stage-2 schedule). So the runs of a sweep over stage-2 settings train stage 1
once: the first to finish it writes ``KEY.safetensors`` under the cache directory
(the student and the projection, and the phase's lines of metrics), and the others
start stage 2 from it. The kept metrics lines are the first run's: scored on the
same val shards (they are in the key), with its prediction settings. A run that
starts from the cache ends with the weights it
would have had by training stage 1 itself (the method draws the projection's init
before the head's, every epoch seeds itself, and stage 2 starts a fresh optimizer
and gradient scaler either way; `tests/test_phases.py` checks it bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from gendd_pipe.config import to_dict
from gendd_pipe.distill.checkpoint import read_checkpoint, save_checkpoint
from gendd_pipe.distill.methods import Phase
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url

log = logging.getLogger(__name__)

FORMAT = "gendd-pipe/stage1-1"


def stage1_key(cfg, phase: Phase, manifest: dict, urls: list[str], counts: dict[str, int], val_urls: list[str],
               world: int) -> str:
    """A digest of everything a stage-1 phase's result depends on, and of the val shards its kept metrics lines
    were scored on."""
    what = {"teacher": manifest["teacher"], "preprocessing": manifest["preprocessing"], "views": manifest["views"],
            "shards": [public_url(u) for u in urls], "counts": counts, "val": [public_url(u) for u in val_urls],
            "student": to_dict(cfg.student),
            "seed": cfg.seed, "unsupervised": cfg.unsupervised, "amp": cfg.runtime.amp, "world": world,
            "loader": {k: getattr(cfg.loader, k) for k in ("batch_size", "shuffle_buffer", "label_smoothing")},
            "phase": {k: getattr(phase, k) for k in ("epochs", "lr", "min_lr", "weight_decay", "fresh_scale")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:20]


def save_stage1(path: str, state: dict[str, torch.Tensor], lines: list[dict]) -> None:
    """Write a finished stage 1: its weights and its metrics lines (atomically; a concurrent writer of the same
    key writes the same bytes)."""
    save_checkpoint(path, {"state_dict": state, "lines": lines}, fmt=FORMAT)
    log.info("%s: stage 1 kept for runs of the same stage-1 settings", path)


def read_stage1(path: str) -> dict | None:
    """The finished stage 1 kept at ``path``, or None when there is none yet."""
    return read_checkpoint(path, fmt=FORMAT) if os.path.exists(path) else None


def restore_stage1(cached: dict, method: torch.nn.Module, path: str) -> list[dict]:
    """Load a finished stage 1 (`read_stage1`) into ``method`` (the student and the projection); returns its
    metrics lines."""
    own = method.state_dict()
    wrong = [k for k, v in cached["state_dict"].items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise GenddError(f"{path}: a stage 1 of another student ({wrong[0]}); remove the file to train it again")
    method.load_state_dict(cached["state_dict"], strict=False)
    log.info("%s: stage 1 taken from the cache (%d epochs)", path, len(cached["lines"]))
    return cached["lines"]


def cache_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.safetensors")
