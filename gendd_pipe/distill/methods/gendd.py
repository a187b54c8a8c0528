"""GenDD: a conditional diffusion head learns p(teacher feature | student feature) (arXiv 2507.14503).

The student feature, through a LayerNorm projector, conditions the `DiffusionHead`
on the teacher's cached feature after Distribution Contraction
(``(1 - s) * feature + s * W[y]``) and a Beta feature mixup of condition and
target. The student's own linear head trains on detached features. Predictions:
that head (``student``), and features sampled from the diffusion head read by
the teacher's classifier (``gendd``, the primary predictor).

With ``stage1_epochs``, the run begins with the official stage 1
(``main_gendd_pretrain.py``) as a phase of its own: the student plus a
projection (the identity when the student's and the teacher's feature widths
match, else a linear map) into the frozen teacher classifier, trained with
cross-entropy on random-resized crops drawn afresh each epoch (no cached
feature is read), by its own AdamW (betas 0.9 / 0.999) on a cosine from the
stage-1 lr to min_lr without warmup. Stage 2 then starts a fresh optimizer: the
run's warmup, schedule and beta2 ramp over the stage-2 epochs alone.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from gendd_pipe.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, Probability, Range, configclass
from gendd_pipe.distill.methods.base import Method, Phase, TeacherHead, label_of, register, train_phase
from gendd_pipe.models.gendd_head import DiffusionHead, HeadConfig, SamplingConfig
from gendd_pipe.models.student import Student


@configclass
class GenddConfig:
    """GenDD (defaults: the official ImageNet settings)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    predict: SamplingConfig = field(default_factory=SamplingConfig)  # sampling at validation and evaluate
    smooth: Probability = 0.9  # Distribution Contraction: weight of the class center (0 when unsupervised)
    centers: Literal["raw", "scaled"] = "raw"  # scaled: classifier rows rescaled to the mean feature norm
    mixup: NonNegativeFloat = 1.0  # Beta(mixup, mixup) feature-space mixup of condition and target; 0: off
    stage1_epochs: NonNegativeInt = 0  # stage-1 epochs (of the run's epochs): student + projection into the frozen
    # teacher classifier, a phase with its own optimizer and cosine schedule, on fresh crops
    stage1_lr: PositiveFloat | None = None  # stage 1's peak learning rate; None: the run's lr
    stage1_min_lr: NonNegativeFloat | None = None  # the end of stage 1's cosine; None: the run's min_lr
    stage1_scale: Range = (0.08, 1.0)  # stage 1's random-resized-crop scale (official: torchvision's default)
    ce_weight: NonNegativeFloat = 1.0  # the student's own linear head, trained on detached features
    head_weight_decay: NonNegativeFloat = 0.0  # AdamW weight decay of the diffusion head (its LayerNorm projector
    # takes the student's, as the official parameter groups give it)

    @model_validator(mode="after")
    def _steps_fit(self):
        if self.predict.sampling_steps > self.head.train_steps:
            raise ValueError(f"predict.sampling_steps {self.predict.sampling_steps} exceeds head.train_steps "
                             f"{self.head.train_steps}")
        return self


@register("gendd")
class GenDD(Method):
    """Generative Distribution Distillation."""

    section, Config = "gendd", GenddConfig
    predictors, primary = ("student", "gendd"), "gendd"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.unsupervised and cfg.options.stage1_epochs:
            raise ValueError("gendd.stage1_epochs trains on labels; set it to 0 for an unsupervised run")
        if cfg.options.stage1_epochs >= cfg.epochs:
            raise ValueError(f"gendd.stage1_epochs {cfg.options.stage1_epochs} leaves none of the {cfg.epochs} "
                             "epochs to the diffusion head")

    def stage1_state(self) -> dict[str, torch.Tensor]:
        """What stage 1 trains: the student (and its BatchNorm statistics) and the projection."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("student.", "stage1_proj."))}

    @classmethod
    def phases(cls, cfg) -> list[Phase]:
        """Stage 1 (when ``stage1_epochs``), then stage 2 over the rest of the run's epochs."""
        o = cfg.options
        if not o.stage1_epochs:
            return [train_phase(cfg)]
        stage1 = Phase("stage1", o.stage1_epochs, o.stage1_lr or cfg.lr,
                       cfg.min_lr if o.stage1_min_lr is None else o.stage1_min_lr, 0, cfg.weight_decay, (0.999, 0.999),
                       fresh_scale=tuple(o.stage1_scale), selects_best=False)
        return [stage1, train_phase(cfg, "stage2", cfg.epochs - o.stage1_epochs)]

    def __init__(self, student: Student, teacher: TeacherHead, cfg):
        super().__init__(student, teacher, cfg)
        o = self.options
        self.smooth = o.smooth if self.supervised else 0.0
        num_classes, target_dim = teacher.weight.shape
        self.register_buffer("head_weight", teacher.weight.clone())  # (C, D) frozen teacher classifier
        self.register_buffer("head_bias", teacher.bias.clone())  # (C,)
        centers = teacher.weight
        if o.centers == "scaled":
            centers = F.normalize(centers, dim=1) * teacher.feature_norm
        self.register_buffer("centers", centers.clone())  # (C, D) Distribution Contraction targets
        # stage 1: student features mapped into the teacher's feature space, read by its classifier; made first,
        # so that its init (and so stage 1) depends on the seed and the student alone, never on the head
        same = student.num_features == target_dim
        self.stage1_proj = nn.Identity() if same else nn.Linear(student.num_features, target_dim)
        self.projector = nn.LayerNorm(student.num_features)
        self.diffusion = DiffusionHead(target_dim, student.num_features, o.head)

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
        if epoch < self.options.stage1_epochs:
            ce = F.cross_entropy(self.teacher_logits(self.stage1_proj(features)).float(), label_of(batch))
            return {"loss": ce, "stage1_ce": ce}
        logits = self.student.classify(features.detach()).float()  # (B, C) the own head does not train the backbone
        cond = self.projector(features)  # (B, Ds)
        target = self.contract(batch["feature"], label_of(batch))  # (B, D)
        if self.options.mixup > 0:
            lam = torch.distributions.Beta(self.options.mixup, self.options.mixup).sample()  # 0-d, on the CPU (the
            # generator the draws have always come from); a tensor, so a compiled step neither syncs nor breaks
            perm = torch.randperm(cond.shape[0], device=cond.device)
            cond = lam * cond + (1 - lam) * cond[perm]  # (B, Ds)
            target = lam * target + (1 - lam) * target[perm]  # (B, D)
        diffusion = self.diffusion(target, cond)
        ce = self.ce(logits, batch)
        return {"loss": diffusion + self.options.ce_weight * ce, "diffusion": diffusion, "ce": ce}

    def predict(self, features: torch.Tensor, options: SamplingConfig | None = None) -> dict[str, torch.Tensor]:
        """The student's own head, and teacher features sampled from the head (averaged over ``samples`` draws)
        through the teacher classifier."""
        sampling = options or self.options.predict
        out = {"student": self.student.classify(features)}
        cond = self.projector(features).repeat(sampling.samples, 1)  # (S*B, Ds)
        draws = self.diffusion.sample(cond, sampling)  # (S*B, D)
        out["gendd"] = self.teacher_logits(draws.reshape(sampling.samples, features.shape[0], -1).mean(0))
        return out

    def param_groups(self, weight_decay: float, phase: str = "train") -> list[dict]:
        """Stage 1: the student's backbone and the projection, all decayed (the official pretrain's one group).
        Otherwise the student, its own head and the LayerNorm projector decayed, the diffusion head not (the
        official groups exempt parameters named ``diffloss`` or ``ln``, which the projector, ``cls_projector``,
        is not). A head no loss reaches (the student's in stage 1, and without labels) is left out: AdamW would
        skip it all the same, having no gradient, and DDP need not search for it."""
        own = list(self.student.model.get_classifier().parameters())
        if phase == "stage1":
            return [{"params": [*_without(self.student.parameters(), own), *self.stage1_proj.parameters()],
                     "weight_decay": weight_decay}]
        head = list(self.diffusion.parameters())
        apart = [*head, *self.stage1_proj.parameters(), *(own if not self.supervised else [])]  # stage 1's
        # projection does not train here
        return [{"params": _without(self.parameters(), apart), "weight_decay": weight_decay},
                {"params": head, "weight_decay": self.options.head_weight_decay}]


def _without(params, apart) -> list:
    apart = {id(p) for p in apart}
    return [p for p in params if id(p) not in apart]
