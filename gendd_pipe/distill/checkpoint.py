"""Student checkpoints: written atomically each epoch, enough to resume training or to evaluate alone.

A checkpoint is a safetensors file: every tensor of the state under a path-like
name (``state_dict/student.conv1.weight``, ``optimizer/state/#0/exp_avg``), and
in its metadata the ``format`` and a JSON ``tree`` holding everything else, with
each tensor replaced by ``{"__tensor__": NAME}``. Nothing in it is executable,
so opening a checkpoint from anyone runs no code. The state is ``config`` (the
run's `DistillConfig` as written in params.yaml), ``epoch`` (epochs done), the
method's ``state_dict``, the optimizer and scheduler states, ``best`` (the best
primary top-1 and its epoch), and ``teacher`` (the store's teacher and
preprocessing records plus the classifier shape).

Checkpoints of earlier versions (``torch.save`` pickles) still load, through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain
types, so a crafted pickle is refused before any of it runs.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gendd_pipe.errors import GenddError

FORMAT = "gendd-pipe/student-1"
TENSOR, ITEMS = "__tensor__", "__items__"  # a tensor's place in the tree; a dict with int keys (optimizer state)


def _child(name: str, key) -> str:
    return f"{name}/{key}" if name else str(key)


def _split(value, tensors: dict, name: str):
    """``value`` as a JSON tree, moving every tensor into ``tensors`` under its path."""
    if torch.is_tensor(value):
        tensors[name] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _split(v, tensors, _child(name, k)) for k, v in value.items()}
        return {ITEMS: [[k, _split(v, tensors, _child(name, f"#{k}"))] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, _child(name, i)) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint entry {name} is a {type(value).__name__}, not a tensor or a plain value")


def _join(tree, tensors):
    """Inverse of `_split`: ``tensors`` maps a name to its tensor."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            return tensors(tree[TENSOR])
        if set(tree) == {ITEMS}:
            return {k: _join(v, tensors) for k, v in tree[ITEMS]}
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def save_checkpoint(path: str, state: dict, fmt: str = FORMAT) -> None:
    """Write to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, tensors, "")
    tmp = f"{path}.tmp"
    save_file(tensors, tmp,
              metadata={"format": fmt, "tree": json.dumps(tree)})
    os.replace(tmp, path)


def read_checkpoint(path: str, fmt: str = FORMAT) -> dict:
    """Load a checkpoint dict (tensors on CPU), refusing files of another format (``fmt``)."""
    if not os.path.exists(path):
        raise GenddError(f"{path}: no such checkpoint")
    try:
        with safe_open(path, "pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt or "tree" not in meta:
                raise GenddError(f"{path}: not a {fmt} checkpoint (format {meta.get('format')!r})")
            return _join(json.loads(meta["tree"]), f.get_tensor)
    except (SafetensorError, OSError, ValueError, KeyError):
        pass  # not safetensors: a checkpoint of an earlier version, or not a checkpoint at all
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a torn, foreign or code-carrying file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GenddError(f"{path}: not a {fmt} checkpoint; refused to load it ({reason[:200]})") from None
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
