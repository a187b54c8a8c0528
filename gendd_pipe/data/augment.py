"""Replayable augmentation of cached views: a RandAugment draw and a mix (mixup or cutmix) per view.

A training recipe such as the GenDD paper's BEiT-L -> ResNet-50 run (timm's
RandAugment, then timm's ``Mixup`` with mixup 0.2, cutmix 1.0 and label
smoothing 0.1) makes every image it feeds the teacher from random draws. To
cache the teacher's outputs of those images, each draw is made here from a
generator seeded by ``(seed, key, view)`` (as crops are, `gendd_pipe.seeds.rng`) and kept
beside the view, so that the student's loader renders the very image the teacher
saw:

- a color jitter, 6 numbers per view (`gendd_pipe.store.format.JITTER_FIELDS`): the order in which
  brightness, contrast and saturation apply, and their factors, drawn as
  torchvision's ``ColorJitter(j, j, j)`` draws them (the official BEiT loader's,
  applied before RandAugment) and applied with torchvision's functions.
- a RandAugment draw, (L, 3) per view: for each of the L layers the index of
  the op in timm's op list for the config string, its magnitude (-1 where the
  layer's probability skipped it) and whether its signed level is negated.
  timm's own op functions and level functions apply it (`apply_randaugment`);
  the draws follow timm's ``RandAugment`` and ``AugmentOp`` (choice of ops, the
  layer probability, Gaussian or uniform magnitude noise, the clip, the coin of
  ``_randomly_negate``).
- a mix, 7 numbers per view (`gendd_pipe.store.format.MIX_FIELDS`): the partner's row in the same shard
  (-1: not mixed), the kind (0 mixup, 1 cutmix), lambda, and the cutmix box as
  fractions of the output (top, left, bottom, right). The draw follows timm's
  ``Mixup`` per element: the mix probability, the switch between cutmix and
  mixup, lambda from Beta(alpha, alpha), the box of ``rand_bbox`` and lambda
  corrected to the box's area. The partner's own view of the same index (its
  crop and RandAugment, unmixed) is what is mixed in.

Pixels are mixed as uint8 (mixup rounds ``lam * a + (1 - lam) * b``), so the
teacher and the student get the same bytes. The label of a view is timm's
``mixup_target`` of the sample's and the partner's labels (`mixed_target`).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image
from pydantic import field_validator
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.mixup import mixup_target
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import functional as TF

from gendd_pipe.config import NonNegativeFloat, Probability, configclass

MIXUP, CUTMIX = 0, 1
NO_MIX = np.array([-1, MIXUP, 1, 0, 0, 0, 0], dtype=np.float32)
SKIPPED = -1.0  # the magnitude of a RandAugment layer that its probability skipped
NO_JITTER = np.array([0, 1, 2, 1, 1, 1], dtype=np.float32)
_JITTER_FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)

# Ops whose timm level function flips the sign of its value with probability 1/2 (`_randomly_negate`).
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
# ... and those whose level is 1 +- 0.9 * magnitude / 10, at least 0.1 (`_enhance_increasing_level_to_arg`).
SIGNED_ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
# Ops that draw randomness of their own inside the pixel function, which no stored draw could replay.
UNREPLAYABLE = {"GaussianBlurRand"}
_SECTION = re.compile(r"(m|n)\d+|p[\d.]+|mstd[\d.]+|mmax\d+|inc[01]|t(weights|3a|3aw)")


@configclass
class AugmentConfig:
    """Augmentation drawn per cached view beside its crop and flip (views 1..count-1; view 0 stays the eval view)."""

    randaugment: str | None = None  # timm RandAugment config string (rand-m9-mstd0.5, rand-n2-m7-mstd0.5-inc1); None: off
    mixup: NonNegativeFloat = 0.0  # Beta(mixup, mixup) lambda of a mixup; 0: no mixup
    cutmix: NonNegativeFloat = 0.0  # Beta(cutmix, cutmix) lambda of a cutmix; 0: no cutmix
    mix_prob: Probability = 1.0  # probability that a view is mixed at all (timm Mixup's prob)
    switch_prob: Probability = 0.5  # with both on: probability of cutmix rather than mixup (timm's switch_prob)
    color_jitter: NonNegativeFloat = 0.0  # torchvision ColorJitter(j, j, j) before RandAugment (the official BEiT
    # loader's 0.4): brightness, contrast and saturation factors in [max(0, 1 - j), 1 + j], in a random order; 0: off

    @field_validator("randaugment")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_randaugment(value)
        return value

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    @property
    def active(self) -> bool:
        return self.randaugment is not None or self.mixing or self.color_jitter > 0


def parse_randaugment(config: str, size: tuple[int, int] = (224, 224), fill: tuple[int, ...] = (124, 116, 104),
                      interpolation: str = "bicubic") -> RandAugment:
    """timm's RandAugment for ``config``, with the hparams timm's training transform gives it at an output
    ``size`` (translate_const 45% of the short side, one fixed interpolation); ``fill`` is the color geometric
    ops fill with (`fill_color` of the teacher's mean: the same for every network that replays the view).

    Raises:
        ValueError: a config string timm does not parse (any section it would ignore included) or one whose ops
            draw randomness that cannot be replayed.
    """
    sections = config.split("-")
    bad = [s for s in sections[1:] if not _SECTION.fullmatch(s)]
    if sections[0] != "rand" or bad:
        what = f"section {bad[0]!r}" if bad else f"policy {sections[0]!r} (not rand)"
        raise ValueError(f"RandAugment config {config!r}: timm does not parse its {what}; "
                         "use e.g. rand-m9-mstd0.5 (sections m, n, p, mstd, mmax, inc, t)")
    hparams = {"translate_const": int(min(size) * 0.45), "img_mean": tuple(fill),
               "interpolation": str_to_pil_interp(interpolation)}
    try:
        augment = rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as exc:
        raise ValueError(f"RandAugment config {config!r}: timm does not parse it ({exc or type(exc).__name__})") from None
    unreplayable = sorted({op.name for op in augment.ops} & UNREPLAYABLE)
    if unreplayable:
        raise ValueError(f"RandAugment config {config!r}: op {unreplayable[0]} draws randomness of its own that a "
                         "cached view cannot replay; choose another transform set")
    return augment


def fill_color(mean: tuple[float, ...]) -> tuple[int, ...]:
    """The fill of geometric ops: the mean color in 0..255, as timm's training transform sets it."""
    return tuple(min(255, round(255 * x)) for x in mean)


def draw_randaugment(augment: RandAugment, rng: np.random.Generator) -> np.ndarray:
    """One view's RandAugment draw, (L, 3): op index, magnitude (`SKIPPED` where the layer does not apply),
    negate (0 or 1)."""
    weights = augment.choice_weights
    chosen = rng.choice(len(augment.ops), augment.num_layers, replace=weights is None, p=weights)
    draw = np.zeros((augment.num_layers, 3), dtype=np.float32)
    for layer, index in enumerate(chosen):
        op = augment.ops[index]
        draw[layer, 0] = index
        if op.prob < 1.0 and rng.random() > op.prob:
            draw[layer, 1] = SKIPPED
            continue
        magnitude = op.magnitude
        if op.magnitude_std == float("inf"):
            magnitude = rng.uniform(0, magnitude)
        elif op.magnitude_std > 0:
            magnitude = rng.normal(magnitude, op.magnitude_std)
        draw[layer, 1] = max(0.0, min(magnitude, op.magnitude_max or 10.0))
        draw[layer, 2] = float(rng.random() > 0.5)
    return draw


def no_randaugment(layers: int) -> np.ndarray:
    """The draw of a view without RandAugment (view 0): every layer skipped."""
    draw = np.zeros((layers, 3), dtype=np.float32)
    draw[:, 1] = SKIPPED
    return draw


def level_args(op, magnitude: float, negate: bool) -> tuple:
    """The arguments of ``op``'s pixel function at ``magnitude``, the sign fixed by ``negate`` where timm's level
    function would flip a coin for it."""
    if op.level_fn is None:
        return ()
    if op.name in SIGNED_ENHANCE:
        level = magnitude / 10.0 * 0.9
        return (max(0.1, 1.0 - level if negate else 1.0 + level),)
    args = op.level_fn(magnitude, op.hparams)
    if op.name in SIGNED:
        return (-abs(args[0]) if negate else abs(args[0]),)
    return args


def apply_randaugment(image: Image.Image, draw: np.ndarray, augment: RandAugment) -> Image.Image:
    """``image`` through the ops of one stored draw (L, 3), in order."""
    for index, magnitude, negate in draw.tolist():
        if magnitude == SKIPPED:
            continue
        op = augment.ops[int(index)]
        image = op.aug_fn(image, *level_args(op, magnitude, negate >= 0.5), **op.kwargs)
    return image


def draw_jitter(strength: float, rng: np.random.Generator) -> np.ndarray:
    """One view's color jitter (`JITTER_FIELDS`), as torchvision's ``ColorJitter(j, j, j, 0).get_params`` draws
    it: a random order of the three ops (its permutation of four, the absent hue left out) and each factor uniform
    in [max(0, 1 - j), 1 + j]."""
    order = rng.permutation(3)
    factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, 3)
    return np.concatenate([order, factors]).astype(np.float32)


def apply_jitter(image: Image.Image, jitter: np.ndarray) -> Image.Image:
    """``image`` through one stored color jitter: torchvision's adjust functions in the stored order."""
    for op in jitter[:3].astype(int).tolist():
        image = _JITTER_FNS[op](image, float(jitter[3 + op]))
    return image


def draw_mix(cfg: AugmentConfig, rng: np.random.Generator, row: int, rows: int, size: tuple[int, int]) -> np.ndarray:
    """One view's mix (`MIX_FIELDS`) for the sample in ``row`` of a shard of ``rows`` samples, the cutmix box for
    an output of ``size`` (height, width); `NO_MIX` when the view is not mixed."""
    if not cfg.mixing or rng.random() >= cfg.mix_prob:
        return NO_MIX.copy()
    if cfg.mixup > 0 and cfg.cutmix > 0:
        cut = bool(rng.random() < cfg.switch_prob)
    else:
        cut = cfg.cutmix > 0
    alpha = cfg.cutmix if cut else cfg.mixup
    lam = float(rng.beta(alpha, alpha))
    partner = (row + 1 + int(rng.integers(rows - 1))) % rows  # any other sample of the shard
    if not cut:
        return np.array([partner, MIXUP, lam, 0, 0, 0, 0], dtype=np.float32)
    h, w = size
    ratio = math.sqrt(1 - lam)  # timm's rand_bbox (no margin), then lambda corrected to the box's area
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
    lam = 1 - (bottom - top) * (right - left) / (h * w)
    return np.array([partner, CUTMIX, lam, top / h, left / w, bottom / h, right / w], dtype=np.float32)


def is_mixed(mix: np.ndarray) -> bool:
    return mix[0] >= 0


def mix_pixels(image: torch.Tensor, partner: torch.Tensor, mix: np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W) pixels of a view mixed with its partner's (the same shape) by one stored mix."""
    if not is_mixed(mix):
        return image
    lam = float(mix[2])
    if int(mix[1]) == MIXUP:
        return (image.float() * lam + partner.float() * (1 - lam)).round_().clamp_(0, 255).to(torch.uint8)
    h, w = image.shape[1:]
    top, left, bottom, right = (round(float(f) * n) for f, n in zip(mix[3:], (h, w, h, w)))
    out = image.clone()
    out[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    return out


def mixed_target(label: int, partner_label: int, lam: float, num_classes: int, smoothing: float) -> torch.Tensor:
    """The soft label (C,) of a view: timm's ``mixup_target`` of the sample's label and its partner's (lam 1 and
    any partner for an unmixed view: the smoothed one-hot label)."""
    target = torch.tensor([label, partner_label])
    return mixup_target(target, num_classes, lam, smoothing)[0].float()
