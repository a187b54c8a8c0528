"""Students: any timm model, its pooled feature and its own linear head.

The feature is timm's ``forward_head(forward_features(x), pre_logits=True)``, the
same definition as the teacher's cached feature; the student's classifier is the
model's own (``get_classifier()``), sized to the teacher's classes so that every
method's logits live in the teacher's label space. Preprocessing (mean, std,
interpolation, crop) is timm's resolved data config for the model, with an
optional square input-size override.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from gendd_pipe.config import PositiveInt, configclass
from gendd_pipe.models.hub import create_model


@configclass
class StudentConfig:
    """Which student to train and at what input size."""

    name: str = "resnet18"  # any name timm takes (its architecture; the student starts from random weights)
    input_size: PositiveInt | None = None  # square input override; None keeps timm's default


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
    model = create_model(cfg.name, "student", pretrained=False, num_classes=num_classes)
    data_config = timm.data.resolve_model_data_config(model)
    if cfg.input_size is not None:
        data_config["input_size"] = (3, cfg.input_size, cfg.input_size)
    return Student(model, cfg, data_config)
