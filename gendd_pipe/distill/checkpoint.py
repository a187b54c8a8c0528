"""Student checkpoints: written atomically each epoch, enough to resume training or to evaluate alone.

A checkpoint is a ``torch.save`` dict: ``format``, ``config`` (the run's
`DistillConfig` as written in params.yaml), ``epoch`` (epochs done), the method's ``state_dict`` (student,
diffusion head, teacher classifier buffers), the optimizer and scheduler
states, ``best`` (the best primary top-1 and its epoch), and ``teacher`` (the
store's teacher and preprocessing records plus the classifier shape).
"""

from __future__ import annotations

import os

import torch

from gendd_pipe.errors import GenddError

FORMAT = "gendd-pipe/student-1"


def save_checkpoint(path: str, state: dict, fmt: str = FORMAT) -> None:
    """Write to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"format": fmt, **state}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str, fmt: str = FORMAT) -> dict:
    """Load a checkpoint dict (tensors on CPU), refusing files of another format (``fmt``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise GenddError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # torch raises many kinds for a torn or foreign file
        raise GenddError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise GenddError(f"{path}: not a {fmt} checkpoint")
    return ckpt


def load_state(method: torch.nn.Module, state: dict, path: str) -> None:
    """Load weights, turning a size mismatch into one line naming the first tensors that differ."""
    own = method.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own
             and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    if wrong or missing:
        detail = "; ".join(wrong[:3]) if wrong else f"missing {', '.join(missing[:3])}"
        raise GenddError(f"{path}: checkpoint does not fit this student and head ({detail})")
    method.load_state_dict(state)
