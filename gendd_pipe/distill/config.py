"""The distill config: one frozen dataclass that params.yaml, the CLI and checkpoints share."""

from __future__ import annotations

from dataclasses import dataclass, field

from gendd_pipe.data.loader import LoaderConfig
from gendd_pipe.distill.methods import METHODS, GenddConfig, LogitConfig
from gendd_pipe.models.student import StudentConfig


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run (defaults: the official GenDD ImageNet optimisation settings)."""

    method: str = "gendd"  # gendd | kd | dkd | gdkd | ce
    unsupervised: bool = False  # no label enters any loss (GenDD with smooth 0, KD as pure KL)
    student: StudentConfig = field(default_factory=StudentConfig)
    epochs: int = 100
    lr: float = 2e-3  # AdamW peak learning rate
    min_lr: float = 1e-6  # end of the cosine schedule
    warmup_epochs: int = 10  # linear learning-rate warmup
    weight_decay: float = 2e-2  # AdamW weight decay of the student
    head_weight_decay: float = 0.0  # weight decay of the diffusion head and its LayerNorm projector
    beta2: tuple[float, float] = (0.96, 0.999)  # AdamW beta2 rises from the first to the second (cosine) over training
    seed: int = 0  # init, shuffling, view choice, noise: a resumed run replays the same epochs
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    logit: LogitConfig = field(default_factory=LogitConfig)  # ce, kd, dkd, gdkd
    gendd: GenddConfig = field(default_factory=GenddConfig)
    eval_samples: int = 1  # gendd: sampled features averaged per val image
    probe: bool | None = None  # fit a linear probe on train features each epoch; None: when unsupervised

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def with_probe(self) -> bool:
        return self.unsupervised if self.probe is None else self.probe
