"""Students: any timm model, its pooled feature and its own linear head.

The feature is timm's ``forward_head(forward_features(x), pre_logits=True)``, the
same definition as the teacher's cached feature; the student's classifier is the
model's own (``get_classifier()``), sized to the teacher's classes so that every
method's logits live in the teacher's label space. Preprocessing (mean, std,
interpolation, crop) is timm's resolved data config for the model, with an
optional square input-size override and an optional eval transform (``eval``:
resize the short edge, center-crop the input size, with one interpolation), for a
student trained from scratch that has no reason to keep timm's pretrained
crop_pct and interpolation.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from dataclasses import field
from typing import Any, Literal

from pydantic import model_validator

from gendd_pipe.config import PositiveInt, configclass
from gendd_pipe.errors import GenddError
from gendd_pipe.models.hub import create_model


@configclass
class EvalTransform:
    """How val images are made: resize the short edge to ``resize``, then center-crop the input size."""

    resize: PositiveInt | None = None  # short edge before the crop; None: timm's (input size / the model's crop_pct)
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None  # None: the model's timm default


@configclass
class StudentConfig:
    """Which student to train, at what input size, and how its val images are made."""

    name: str = "resnet18"  # any name timm takes (its architecture; the student starts from random weights)
    input_size: PositiveInt | None = None  # square input override; None keeps timm's default
    model_args: dict[str, Any] = field(default_factory=dict)  # timm.create_model keyword arguments of the
    # architecture (zero_init_last: false, act_layer: relu)
    eval: EvalTransform = field(default_factory=EvalTransform)  # the eval transform (None fields: timm's)

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.input_size and self.eval.resize and self.eval.resize < self.input_size:
            raise ValueError(f"eval.resize {self.eval.resize} is smaller than the {self.input_size} px center crop "
                             "(input_size) it is cut to")
        return self


class Student(nn.Module):
    """A timm model split into ``features`` (pooled, pre-logits) and ``classify`` (its linear head)."""

    def __init__(self, model: nn.Module, config: StudentConfig, data_config: dict):
        super().__init__()
        self.model, self.config, self.data_config = model, config, data_config

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> pooled features (N, D)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Features (N, D) -> logits (N, C) of the student's own linear head."""
        return self.model.get_classifier()(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


def create_student(cfg: StudentConfig, num_classes: int) -> Student:
    """A randomly initialised student with ``num_classes`` outputs (seed torch first for repeatable init)."""
    try:
        model = create_model(cfg.name, "student", pretrained=False, num_classes=num_classes, **cfg.model_args)
    except TypeError as exc:  # an argument the architecture does not take
        raise GenddError(f"student.model_args: {cfg.name} does not take {sorted(cfg.model_args)} "
                         f"({str(exc).splitlines()[0]})") from None
    data_config = timm.data.resolve_model_data_config(model)
    if cfg.input_size is not None:
        data_config["input_size"] = (3, cfg.input_size, cfg.input_size)
    size = data_config["input_size"][1]
    if cfg.eval.resize is not None:
        if cfg.eval.resize < size:
            raise GenddError(f"student.eval.resize: {cfg.eval.resize} is smaller than {cfg.name}'s {size} px center "
                             "crop; use at least the input size")
        data_config.update(crop_pct=size / cfg.eval.resize, crop_mode="center")
    if cfg.eval.interpolation is not None:
        data_config["interpolation"] = cfg.eval.interpolation
    return Student(model, cfg, data_config)
