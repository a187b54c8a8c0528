"""Logit-distillation losses computed from cached teacher logits.

- `kd_loss`: Hinton et al. 2015, KL(teacher || student) of temperature-softened
  distributions, scaled by T^2.
- `dkd_loss`: Decoupled KD (Zhao et al. 2022): target-class binary KL (TCKD)
  plus the KL among non-target classes (NCKD), weighted alpha and beta.
- `gdkd_loss`: Generalized DKD (Zhang et al., "Rethinking Decoupled Knowledge
  Distillation"): the classes are split into the teacher's top-k and the rest;
  the loss is the binary KL of the two partitions' masses (w0) plus the KL
  within the top-k (w1) and within the rest (w2). No label is needed.
- `standardize`: logit standardization (Sun et al. 2024) applied to both sides
  before the temperature.

All losses are batch means; inputs are (B, C) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# subtracted from masked-out logits so that a softmax over a subset ignores them
_MASK = 1000.0


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of logits (mean 0, unit standard deviation)."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + eps)


def _kl(log_p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(teacher || student) from student log-probs and teacher probs."""
    return F.kl_div(log_p_student, p_teacher, reduction="sum") / log_p_student.shape[0]


def _binary(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2): the probability mass inside and outside ``mask``."""
    inside = (probs * mask).sum(dim=1, keepdim=True)
    return torch.cat([inside, (probs * ~mask).sum(dim=1, keepdim=True)], dim=1)


def _masked_kl(student: torch.Tensor, teacher: torch.Tensor, drop: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL between the distributions restricted to the classes not in ``drop``."""
    log_p_s = F.log_softmax(student / temperature - _MASK * drop, dim=1)
    p_t = F.softmax(teacher / temperature - _MASK * drop, dim=1)
    return _kl(log_p_s, p_t)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return _kl(log_p_s, p_t) * temperature**2


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
             temperature: float) -> torch.Tensor:
    """DKD: alpha * TCKD + beta * NCKD, both scaled by T^2."""
    gt = F.one_hot(target, student.shape[1]).bool()
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    tckd = _kl(torch.log(_binary(p_s, gt)), _binary(p_t, gt))
    nckd = _masked_kl(student, teacher, gt, temperature)
    return (alpha * tckd + beta * nckd) * temperature**2


def topk_mask(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C) bool mask of each row's k largest teacher logits."""
    return torch.zeros_like(teacher, dtype=torch.bool).scatter_(1, teacher.topk(k, dim=1).indices, True)


def gdkd_loss(student: torch.Tensor, teacher: torch.Tensor, k: int, w0: float, w1: float, w2: float,
              temperature: float) -> torch.Tensor:
    """GDKD: w0 * KL of the top-k / rest masses + w1 * KL within top-k + w2 * KL within the rest, times T^2."""
    top = topk_mask(teacher, k)
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    partition = _kl(torch.log(_binary(p_s, top)), _binary(p_t, top))
    inside = _masked_kl(student, teacher, ~top, temperature)
    outside = _masked_kl(student, teacher, top, temperature)
    return (w0 * partition + w1 * inside + w2 * outside) * temperature**2
