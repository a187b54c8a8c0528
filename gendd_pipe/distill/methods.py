"""Distillation methods: a student plus what each method adds, behind one interface.

Every method is an ``nn.Module`` holding the `Student` and takes a batch from the
store-backed loader (``image``, ``label``, ``feature``, ``logits``):

- ``loss(batch, epoch) -> dict``: the training loss (``loss``) and its parts.
- ``predict(images) -> dict``: logits of each predictor the method has.

`METHODS` maps the CLI's names to the classes. The logit baselines (``ce``,
``kd``, ``dkd``, ``gdkd``) train the student's classifier directly; ``gendd``
trains a conditional diffusion head on the teacher's features (GenDD, arXiv
2507.14503) and the student's own linear head on detached features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gendd_pipe.errors import GenddError
from gendd_pipe.losses import dkd_loss, gdkd_loss, kd_loss, standardize
from gendd_pipe.models.gendd_head import DiffusionHead, HeadConfig
from gendd_pipe.models.student import Student

CENTERS = ("raw", "scaled")


@dataclass(frozen=True)
class LogitConfig:
    """The logit baselines (defaults: the DKD paper's CIFAR settings)."""

    ce_weight: float = 1.0  # cross-entropy on labels (dropped when unsupervised)
    temperature: float = 4.0  # softmax temperature of kd, dkd and gdkd
    kd_weight: float = 1.0  # kd: weight of the KL term
    alpha: float = 1.0  # dkd: target-class term (TCKD)
    beta: float = 8.0  # dkd: non-target term (NCKD)
    k: int = 5  # gdkd: size of the teacher's top-k partition
    w0: float = 1.0  # gdkd: top-k vs rest mass term
    w1: float = 1.0  # gdkd: within top-k term
    w2: float = 8.0  # gdkd: within the rest term
    warmup_epochs: int = 20  # dkd, gdkd: the distillation term ramps up linearly over these epochs
    logit_std: bool = False  # standardize student and teacher logits before the temperature


@dataclass(frozen=True)
class GenddConfig:
    """GenDD (defaults: the official ImageNet settings)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    smooth: float = 0.9  # Distribution Contraction: weight of the class center in the target (0 when unsupervised)
    centers: str = "raw"  # raw: the teacher classifier rows as they are | scaled: rescaled to the mean feature norm
    mixup: float = 1.0  # Beta(mixup, mixup) feature-space mixup of condition and target; 0 turns it off
    stage1_epochs: int = 0  # warmup epochs: student + linear projection into the frozen teacher classifier, CE
    ce_weight: float = 1.0  # the student's own linear head, trained on detached features

    def __post_init__(self):
        if self.centers not in CENTERS:
            raise ValueError(f"centers must be one of {', '.join(CENTERS)}, not {self.centers!r}")


@dataclass
class TeacherHead:
    """What a method knows of the teacher: its classifier and feature statistics, from the store."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    feature_norm: float  # mean L2 norm of the cached features (for scaled centers)


class Method(nn.Module):
    """Base: a student, whether labels enter the loss, and the student's own head as a predictor."""

    needs_logits = False  # needs the store's full logits
    needs_labels = False  # cannot run unsupervised
    primary = "student"  # the predictor that picks the best epoch

    def __init__(self, student: Student, teacher: TeacherHead, supervised: bool):
        super().__init__()
        self.student, self.supervised = student, supervised

    def forward(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        """The training loss (what DDP wraps); subclasses implement `loss`."""
        return self.loss(batch, epoch)

    def ce(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"]) if self.supervised else logits.new_zeros(())

    def predict(self, features: torch.Tensor, samples: int = 1, **sampling) -> dict[str, torch.Tensor]:
        """Logits of each predictor from student features (N, D); ``samples`` and ``sampling`` are GenDD's."""
        return {"student": self.student.classify(features)}


class LogitMethod(Method):
    """The student's logits against labels and the cached teacher logits."""

    def __init__(self, student: Student, teacher: TeacherHead, supervised: bool, cfg: LogitConfig):
        super().__init__(student, teacher, supervised)
        self.cfg = cfg

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict, epoch: int) -> torch.Tensor:
        """The distillation term of methods that read teacher logits (``needs_logits``)."""
        raise NotImplementedError

    def ramp(self, epoch: int) -> float:
        return min((epoch + 1) / self.cfg.warmup_epochs, 1.0) if self.cfg.warmup_epochs > 0 else 1.0

    def loss(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        logits = self.student(batch["image"])  # (B, C)
        ce = self.ce(logits, batch)
        parts = {"ce": ce}
        if self.needs_logits:
            student, teacher = logits, batch["logits"]
            if self.cfg.logit_std:
                student, teacher = standardize(student), standardize(teacher)
            parts["kd"] = self.distill(student, teacher, batch, epoch)
        return {"loss": self.cfg.ce_weight * ce + parts.get("kd", 0.0), **parts}


class CE(LogitMethod):
    """Cross-entropy on labels only: the student without a teacher."""

    needs_labels = True


class KD(LogitMethod):
    """Hinton KD; unsupervised it is the pure KL to the teacher."""

    needs_logits = True

    def distill(self, student, teacher, batch, epoch):
        return self.cfg.kd_weight * kd_loss(student, teacher, self.cfg.temperature)


class DKD(LogitMethod):
    """Decoupled KD (needs labels: the target class defines the split)."""

    needs_logits = needs_labels = True

    def distill(self, student, teacher, batch, epoch):
        loss = dkd_loss(student, teacher, batch["label"], self.cfg.alpha, self.cfg.beta, self.cfg.temperature)
        return self.ramp(epoch) * loss


class GDKD(LogitMethod):
    """Generalized DKD: the teacher's top-k defines the split, so it also runs unsupervised."""

    needs_logits = True

    def __init__(self, student: Student, teacher: TeacherHead, supervised: bool, cfg: LogitConfig):
        super().__init__(student, teacher, supervised, cfg)
        if not 0 < cfg.k < teacher.weight.shape[0]:
            raise GenddError(f"gdkd: k={cfg.k} must be between 1 and the class count minus one "
                             f"(the teacher has {teacher.weight.shape[0]} classes)")

    def distill(self, student, teacher, batch, epoch):
        c = self.cfg
        return self.ramp(epoch) * gdkd_loss(student, teacher, c.k, c.w0, c.w1, c.w2, c.temperature)


class GenDD(Method):
    """Generative Distribution Distillation: a diffusion head learns p(teacher feature | student feature)."""

    primary = "gendd"

    def __init__(self, student: Student, teacher: TeacherHead, supervised: bool, cfg: GenddConfig):
        super().__init__(student, teacher, supervised)
        self.cfg = cfg
        self.smooth = cfg.smooth if supervised else 0.0
        num_classes, target_dim = teacher.weight.shape
        self.register_buffer("head_weight", teacher.weight.clone())  # (C, D) frozen teacher classifier
        self.register_buffer("head_bias", teacher.bias.clone())  # (C,)
        centers = teacher.weight
        if cfg.centers == "scaled":
            centers = F.normalize(centers, dim=1) * teacher.feature_norm
        self.register_buffer("centers", centers.clone())  # (C, D) Distribution Contraction targets
        self.projector = nn.LayerNorm(student.num_features)
        self.diffusion = DiffusionHead(target_dim, student.num_features, cfg.head)
        # stage 1: student features mapped into the teacher's feature space, read by its classifier
        self.stage1_proj = nn.Linear(student.num_features, target_dim)

    def teacher_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.head_weight.T + self.head_bias

    def contract(self, target: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Distribution Contraction: (1 - s) * teacher feature + s * center of the label (one-hot or soft)."""
        if self.smooth == 0:
            return target
        centers = label @ self.centers if label.dim() == 2 else self.centers[label]  # (B, D)
        return (1 - self.smooth) * target + self.smooth * centers

    def loss(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        features = self.student.features(batch["image"])  # (B, Ds)
        if epoch < self.cfg.stage1_epochs:
            ce = F.cross_entropy(self.teacher_logits(self.stage1_proj(features)), batch["label"])
            return {"loss": ce, "stage1_ce": ce}
        logits = self.student.classify(features.detach())  # (B, C) the own head does not train the backbone
        cond = self.projector(features)  # (B, Ds)
        target = self.contract(batch["feature"], batch["label"])  # (B, D)
        if self.cfg.mixup > 0:
            m = float(torch.distributions.Beta(self.cfg.mixup, self.cfg.mixup).sample())
            perm = torch.randperm(cond.shape[0], device=cond.device)
            cond = m * cond + (1 - m) * cond[perm]  # (B, Ds)
            target = m * target + (1 - m) * target[perm]  # (B, D)
        diffusion = self.diffusion(target, cond)
        ce = self.ce(logits, batch)
        return {"loss": diffusion + self.cfg.ce_weight * ce, "diffusion": diffusion, "ce": ce}

    def predict(self, features: torch.Tensor, samples: int = 1, **sampling) -> dict[str, torch.Tensor]:
        """The student's own head, and sampled teacher features (averaged over ``samples`` draws) through
        the teacher classifier; ``sampling`` overrides the head's steps, cfg, temperature or sampler."""
        out = {"student": self.student.classify(features)}
        draws = self.diffusion.sample(self.projector(features).repeat(samples, 1), **sampling)  # (S*B, D)
        out["gendd"] = self.teacher_logits(draws.reshape(samples, features.shape[0], -1).mean(0))
        return out


METHODS: dict[str, type[Method]] = {"ce": CE, "kd": KD, "dkd": DKD, "gdkd": GDKD, "gendd": GenDD}


def create_method(name: str, student: Student, teacher: TeacherHead, supervised: bool, logit: LogitConfig,
                  gendd: GenddConfig) -> Method:
    """Build method ``name`` around ``student``."""
    cls = METHODS[name]
    return cls(student, teacher, supervised, gendd if cls is GenDD else logit)
