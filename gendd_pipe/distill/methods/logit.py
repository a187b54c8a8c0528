"""The logit baselines: the student's logits against labels and the cached teacher logits.

``ce`` (labels only), ``kd`` (Hinton et al. 2015; unsupervised, the pure KL to the
teacher), ``dkd`` (Zhao et al. 2022, decoupled KD) and ``gdkd`` (generalized DKD,
"Rethinking Decoupled Knowledge Distillation": the teacher's top-k defines the
partition, so it also runs unsupervised). They share the ``logit`` section.
"""

from __future__ import annotations

import torch

from gendd_pipe.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, configclass
from gendd_pipe.distill.methods.base import Method, TeacherHead, register
from gendd_pipe.errors import GenddError
from gendd_pipe.distill.methods.losses import dkd_loss, gdkd_loss, kd_loss, standardize
from gendd_pipe.models.student import Student


@configclass
class LogitConfig:
    """The logit baselines (defaults: the DKD paper's CIFAR settings)."""

    ce_weight: NonNegativeFloat = 1.0  # cross-entropy on labels (dropped when unsupervised)
    temperature: PositiveFloat = 4.0  # softmax temperature of kd, dkd and gdkd
    kd_weight: NonNegativeFloat = 1.0  # kd: weight of the KL term
    alpha: NonNegativeFloat = 1.0  # dkd: target-class term (TCKD)
    beta: NonNegativeFloat = 8.0  # dkd: non-target term (NCKD)
    k: PositiveInt = 5  # gdkd: size of the teacher's top-k partition
    w0: NonNegativeFloat = 1.0  # gdkd: top-k vs rest mass term
    w1: NonNegativeFloat = 1.0  # gdkd: within top-k term
    w2: NonNegativeFloat = 8.0  # gdkd: within the rest term
    warmup_epochs: NonNegativeInt = 20  # dkd, gdkd: the distillation term ramps up linearly over these epochs
    logit_std: bool = False  # standardize student and teacher logits before the temperature


class LogitMethod(Method):
    """Cross-entropy on the student's logits plus a distillation term on the teacher's (``needs_logits``)."""

    section, Config = "logit", LogitConfig

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def ramp(self, epoch: int) -> float:
        warmup = self.options.warmup_epochs
        return min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0

    def loss(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        logits = self.student(batch["image"]).float()  # (B, C); the losses in float32 under any autocast
        ce = self.ce(logits, batch)
        parts = {"ce": ce}
        if self.needs_logits:
            student, teacher = logits, batch["logits"]  # (B, C), (B, C)
            if self.options.logit_std:
                student, teacher = standardize(student), standardize(teacher)
            parts["kd"] = self.distill(student, teacher, batch, epoch)
        return {"loss": self.options.ce_weight * ce + parts.get("kd", 0.0), **parts}


@register("ce")
class CE(LogitMethod):
    """Cross-entropy on labels only: the student without a teacher."""

    needs_labels = True


@register("kd")
class KD(LogitMethod):
    """Hinton KD; unsupervised it is the pure KL to the teacher."""

    needs_logits = True

    def distill(self, student, teacher, batch, epoch):
        return self.options.kd_weight * kd_loss(student, teacher, self.options.temperature)


@register("dkd")
class DKD(LogitMethod):
    """Decoupled KD (needs labels: the target class defines the split)."""

    needs_logits = needs_labels = True
    mixed_labels = False  # the target class splits the classes; a mixed view has two

    def distill(self, student, teacher, batch, epoch):
        o = self.options
        return self.ramp(epoch) * dkd_loss(student, teacher, batch["label"], o.alpha, o.beta, o.temperature)


@register("gdkd")
class GDKD(LogitMethod):
    """Generalized DKD: the teacher's top-k defines the split, so it also runs unsupervised."""

    needs_logits = True

    def __init__(self, student: Student, teacher: TeacherHead, cfg):
        super().__init__(student, teacher, cfg)
        if not self.options.k < teacher.weight.shape[0]:
            raise GenddError(f"gdkd: k={self.options.k} must be between 1 and the class count minus one "
                             f"(the teacher has {teacher.weight.shape[0]} classes)")

    def distill(self, student, teacher, batch, epoch):
        o = self.options
        return self.ramp(epoch) * gdkd_loss(student, teacher, o.k, o.w0, o.w1, o.w2, o.temperature)
