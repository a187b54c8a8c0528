"""The distill config: one frozen dataclass that params.yaml, the CLI and checkpoints share.

A run is written as the `DistillConfig` fields plus method sections, one per
method family (``logit: {temperature: 2}``, ``gendd: {head: {width: 256}}``), so that
``distill.common`` can hold settings of several methods. `parse_run` validates
every section given and keeps the one of the run's method as ``options``;
`DistillConfig.to_dict` writes that form back (the resolved config, checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gendd_pipe.config import (ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range,
                               configclass, parse, to_dict, unknown_key)
from gendd_pipe.data.loader import LoaderConfig
from gendd_pipe.distill.live import LiveTeacherConfig
from gendd_pipe.distill.methods import get_method, load_error, method_names, sections
from gendd_pipe.errors import GenddError
from gendd_pipe.models.student import StudentConfig
from gendd_pipe.runtime import RuntimeConfig


@configclass
class DistillConfig:
    """A distillation run (defaults: the official GenDD ImageNet optimisation settings)."""

    method: str = "gendd"  # a registered method (gendd_pipe.distill.methods)
    unsupervised: bool = False  # no label enters any loss (GenDD with smooth 0, KD as pure KL)
    student: StudentConfig = field(default_factory=StudentConfig)
    epochs: PositiveInt = 100
    lr: PositiveFloat = 2e-3  # AdamW peak learning rate
    min_lr: NonNegativeFloat = 1e-6  # end of the cosine schedule
    warmup_epochs: NonNegativeInt = 10  # linear learning-rate warmup
    schedule: Literal["cosine", "step"] = "cosine"  # after the warmup: cosine to min_lr, or steps at decay_epochs
    decay_epochs: tuple[PositiveInt, ...] = ()  # step schedule: the lr is multiplied by decay_rate at each of these
    # epochs, counted from the start of the phase (GenDD's stage 2 from its own first epoch), warmup included
    decay_rate: PositiveFloat = 0.1  # step schedule: the factor at each decay epoch
    weight_decay: NonNegativeFloat = 2e-2  # AdamW weight decay of the student
    beta2: Range = (0.96, 0.999)  # AdamW beta2 rises from the first to the second (cosine) over training
    seed: NonNegativeInt = 0  # init, shuffling, view choice, noise: a resumed run replays the same epochs
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device, precision (a resume keeps amp), compile
    probe: bool | None = None  # fit a linear probe on train features each epoch; None: when unsupervised
    teacher: LiveTeacherConfig | None = None  # a live teacher in place of the store: run beside the student on
    # views drawn as an extraction of its settings draws them, a fresh one every epoch (gendd_pipe.distill.live)
    options: Any = Field(default=None, validate_default=True)  # the method's own section (its Config)

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in method_names():  # a plug-in that failed to load says why
            raise ValueError(load_error(name) or f"must be one of {', '.join(method_names())}")
        return name

    @field_validator("options")
    @classmethod
    def _options(cls, value, info: ValidationInfo):
        if "method" not in info.data:  # the method failed its own check
            return value
        config = get_method(info.data["method"]).Config
        if config is None or isinstance(value, config):
            return value
        if value is None or isinstance(value, Mapping):
            return config(**(value or {}))
        raise ValueError(f"must be a {config.__name__} for method {info.data['method']}")

    @model_validator(mode="after")
    def _method_accepts(self):
        if self.schedule == "step" and not self.decay_epochs:
            raise ValueError("schedule step needs decay_epochs (the epochs at which the lr drops)")
        if list(self.decay_epochs) != sorted(set(self.decay_epochs)):
            raise ValueError(f"decay_epochs must rise, got {list(self.decay_epochs)}")
        get_method(self.method).check(self)
        return self

    @property
    def with_probe(self) -> bool:
        return self.unsupervised if self.probe is None else self.probe

    def to_dict(self) -> dict:
        """The run as written in params.yaml: the fields, then the method's section under its key."""
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "options"}
        section = get_method(self.method).section
        if section:
            out[section] = to_dict(self.options)
        return out


RUN_KEYS = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.name != "options")


def parse_run(data: Mapping | None, where: str) -> DistillConfig:
    """A run's settings (`DistillConfig` fields plus method sections) -> `DistillConfig`.

    Every method section given is validated, so a typo in a section of another
    method is refused too; only the run's own method's section is kept.
    """
    data = dict(data or {})
    known = sections()
    for key in data:
        if key not in RUN_KEYS and key not in known:
            raise ConfigError(where, (key,), unknown_key(key, (*RUN_KEYS, *known)))
    parsed = {}
    for key in known.keys() & data.keys():
        try:
            parsed[key] = parse(known[key], data[key])
        except ConfigError as exc:
            raise ConfigError(where, (key, *exc.loc), exc.reason) from None
    base = {k: v for k, v in data.items() if k in RUN_KEYS}
    try:
        section = get_method(str(base.get("method", DistillConfig.method))).section
    except GenddError:  # an unknown method: its own field check reports it
        section = None
    return parse(DistillConfig, {**base, "options": parsed.get(section)}, where)


def upgrade(record: Mapping) -> dict:
    """A run config recorded by an earlier version of this project, in today's keys."""
    data = copy.deepcopy(dict(record))
    gendd = data.get("gendd") or {}
    head = gendd.get("head") or {}
    moved = {key: head.pop(key) for key in ("sampling_steps", "cfg", "temperature", "sampler") if key in head}
    if "eval_samples" in data:
        moved["samples"] = data.pop("eval_samples")
    if moved:
        gendd["predict"] = {**moved, **(gendd.get("predict") or {})}
    if "head_weight_decay" in data:
        gendd["head_weight_decay"] = data.pop("head_weight_decay")
    if gendd:
        data["gendd"] = gendd
    for key, value in (("schedule", "cosine"), ("decay_epochs", []), ("decay_rate", 0.1), ("teacher", None)):
        data.setdefault(key, value)  # before the step schedule, every run was a cosine
    student = data.get("student")
    if isinstance(student, dict):  # before model arguments and the eval transform: timm's own
        student.setdefault("model_args", {})
        student.setdefault("eval", {"resize": None, "interpolation": None})
    loader = data.get("loader") or {}
    if "workers" in loader:
        loader["num_workers"] = loader.pop("workers")
    if loader:
        loader.setdefault("eval_view", True)  # earlier runs trained on every view of a plain store, view 0 too
    return data
