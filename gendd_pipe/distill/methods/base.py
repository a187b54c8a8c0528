"""The method interface and its registry: a method is a class registered under a name.

A method is an ``nn.Module`` around the `Student` that declares what it needs and
how it is configured, so that the training loop, the CLI and the stages need to
know nothing about it:

- ``section`` and ``Config``: the key of its settings in a run (``logit``, ``gendd``)
  and the `configclass` that validates them; methods of one family may share one.
  A ``Config`` with a ``predict`` field holds settings that change prediction only,
  which ``evaluate`` may override.
- ``needs_logits`` / ``needs_labels``: full teacher logits from the store; labels. ``mixed_labels``:
  it can train on mixed views, whose label is soft (``target``).
- ``predictors`` and ``primary``: the logits it predicts with, and which of them
  picks the best epoch.
- ``check(cfg)``: refuses settings it cannot run, before any data is read.
- ``loss(batch, epoch)``, ``predict(features, options)``, ``param_groups(weight_decay, phase)``.
- ``phases(cfg)``: the run's training phases (`Phase`), each with its own optimizer and learning-rate
  schedule; one phase (``train``) unless the method says otherwise (GenDD's stage 1).

`register` adds a class; `get_method` finds one, loading the built-in methods
(every module of this package) and those that other packages declare in the
entry-point group ``gendd_pipe.methods`` (``name = "package.module:Class"``).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gendd_pipe.errors import GenddError
from gendd_pipe.models.student import Student

log = logging.getLogger(__name__)

ENTRY_POINTS = "gendd_pipe.methods"
_REGISTRY: dict[str, type[Method]] = {}
_BROKEN: dict[str, str] = {}  # entry points that failed to load: name -> why
_loaded = False


@dataclass(frozen=True)
class Phase:
    """A span of a run's epochs trained with an optimizer and schedule of its own (AdamW, started afresh)."""

    name: str  # recorded per epoch and in checkpoints: a run killed in a phase resumes in it
    epochs: int
    lr: float  # peak learning rate
    min_lr: float  # the cosine's end
    warmup_epochs: int  # linear warmup from lr / 100
    weight_decay: float  # of the student (a method may keep parts of itself from it: `Method.param_groups`)
    beta2: tuple[float, float]  # AdamW beta2 over the phase's steps, first to last (cosine); equal: constant
    schedule: str = "cosine"  # cosine to min_lr, or step: lr x decay_rate at each of decay_epochs
    decay_epochs: tuple[int, ...] = ()  # step schedule: epochs of the phase at which the lr drops
    decay_rate: float = 0.1
    fresh_scale: tuple[float, float] | None = None  # not None: random-resized crops of this scale drawn afresh
    # every epoch from the images (the store's views and features are not read)
    selects_best: bool = True  # its epochs compete for best.safetensors


def train_phase(cfg, name: str = "train", epochs: int | None = None) -> Phase:
    """The phase a `DistillConfig` describes: its optimizer and schedule settings over ``epochs`` (all of them)."""
    return Phase(name, cfg.epochs if epochs is None else epochs, cfg.lr, cfg.min_lr, cfg.warmup_epochs,
                 cfg.weight_decay, tuple(cfg.beta2), cfg.schedule, tuple(cfg.decay_epochs), cfg.decay_rate)


@dataclass
class TeacherHead:
    """What a method knows of the teacher: its classifier and feature statistics, from the store."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    feature_norm: float  # mean L2 norm of the cached features


class Method(nn.Module):
    """Base: a student, whether labels enter the loss, and the student's own head as a predictor."""

    name: ClassVar[str] = ""  # set by `register`
    section: ClassVar[str | None] = None  # key of the method's settings in a run
    Config: ClassVar[type | None] = None  # the configclass of that section
    needs_logits: ClassVar[bool] = False  # needs the store's full logits
    needs_labels: ClassVar[bool] = False  # cannot run unsupervised
    mixed_labels: ClassVar[bool] = True  # takes the soft label of a mixed view (``target``) where the store has one
    predictors: ClassVar[tuple[str, ...]] = ("student",)
    primary: ClassVar[str] = "student"  # the predictor that picks the best epoch

    def __init__(self, student: Student, teacher: TeacherHead, cfg):
        super().__init__()
        self.student, self.supervised, self.options = student, not cfg.unsupervised, cfg.options

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ValueError for settings (a `DistillConfig`) this method cannot run."""
        if cfg.unsupervised and cls.needs_labels:
            raise ValueError(f"method {cls.name} needs labels and cannot run unsupervised")

    def forward(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        """The training loss (what DDP wraps); subclasses implement `loss`."""
        return self.loss(batch, epoch)

    def loss(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        """``loss`` (what is minimised) and its named parts, from a batch of ``image``, ``label``, ``feature``
        and (full stores) ``logits``."""
        raise NotImplementedError

    def ce(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits, label_of(batch)) if self.supervised else logits.new_zeros(())

    def predict(self, features: torch.Tensor, options=None) -> dict[str, torch.Tensor]:
        """Logits of each predictor from student features (N, D); ``options`` replaces the run's ``predict``
        settings."""
        return {"student": self.student.classify(features)}

    @classmethod
    def phases(cls, cfg) -> list[Phase]:
        """The training phases of a run (a `DistillConfig`), in order; their epochs add up to ``cfg.epochs``."""
        return [train_phase(cfg)]

    @property
    def unused_parameters(self) -> bool:
        """Whether a parameter of a phase's `param_groups` can be left out of its loss (DDP then searches for them
        every step, at a cost); those outside the groups are no matter, the phase leaves them out of autograd."""
        return False

    def param_groups(self, weight_decay: float, phase: str = "train") -> list[dict]:
        """AdamW parameter groups of ``phase``; the student's ``weight_decay`` applies unless the method says
        otherwise. Parameters in no group are frozen for the phase."""
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


def label_of(batch: dict) -> torch.Tensor:
    """A batch's labels as the losses take them: the soft labels (B, C) where the loader made them (mixed views,
    label smoothing), else the class indices (B,)."""
    return batch["target"] if "target" in batch else batch["label"]


def register(name: str):
    """Class decorator: make a `Method` available as ``method: NAME``."""

    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise GenddError(f"method {name!r} is registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
        for other in _REGISTRY.values():
            if cls.section and other.section == cls.section and other.Config is not cls.Config:
                raise GenddError(f"method {name!r} declares section {cls.section!r} with another Config than "
                                 f"method {other.name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def _load() -> None:
    """Import the built-in methods (the modules of this package), then the entry points of other packages."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    for point in entry_points(group=ENTRY_POINTS):
        if point.name in _REGISTRY:
            continue
        try:
            cls = point.load()
        except Exception as exc:  # a broken plug-in names itself when chosen, and breaks no other method
            first = str(exc).splitlines()[0] if str(exc) else ""
            _BROKEN[point.name] = f"method {point.name!r} (entry point {point.value}): cannot load " \
                                  f"({type(exc).__name__}: {first})"
            log.warning("%s", _BROKEN[point.name])
            continue
        if point.name not in _REGISTRY:
            register(point.name)(cls)


def method_names() -> list[str]:
    """Registered method names, sorted."""
    _load()
    return sorted(_REGISTRY)


def load_error(name: str) -> str | None:
    """Why the plug-in ``name`` could not be loaded; None when it loaded or no package declares it."""
    _load()
    return _BROKEN.get(name)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _load()
    if name in _BROKEN:
        raise GenddError(_BROKEN[name])
    if name not in _REGISTRY:
        raise GenddError(f"unknown method {name!r} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def create_method(cfg, student: Student, teacher: TeacherHead) -> Method:
    """The method that ``cfg`` (a `DistillConfig`) names, around ``student``."""
    return get_method(cfg.method)(student, teacher, cfg)


def sections() -> dict[str, type]:
    """Section key -> config class of every registered method that has settings."""
    _load()
    return {cls.section: cls.Config for cls in _REGISTRY.values() if cls.section}
