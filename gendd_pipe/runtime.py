"""Where and in what precision a network runs: the ``runtime`` section of every stage that runs one.

``device`` is ``auto`` (the first CUDA device when there is one, else the CPU),
``cpu``, ``cuda`` or ``cuda:N``; ``amp`` is ``off`` (float32), ``bf16`` or
``fp16`` autocast (bf16 works on the CPU as well, so tests run the same code
path without a GPU); ``channels_last`` sets the memory format of models and
inputs; ``compile`` wraps the model in ``torch.compile``.

Models are placed once with `place` and wrapped by `compiled`; code that runs
them moves its inputs with `to_device` (loaders' uint8 pixels with `network_input`,
which normalizes them on the device) and runs them under `autocast`, so no
model code names a device. `grad_scaler` is the gradient scaler fp16 training needs.
The compute precision changes the stored bytes of an extraction, so the
manifest records `precision`.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Literal

import torch
from pydantic import field_validator
from torchvision.transforms.functional import normalize

from gendd_pipe.config import configclass
from gendd_pipe.errors import GenddError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@configclass
class RuntimeConfig:
    """The device, precision and compilation of the networks a stage runs."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast precision; off runs float32
    channels_last: bool = True  # NHWC models and inputs (faster convolutions on CPUs and tensor cores)
    compile: bool = False  # torch.compile the model (minutes of warm-up; pays off on long GPU runs)
    tf32: bool = True  # training on CUDA: TF32 matmuls and convolutions, cuDNN autotuning; false: IEEE float32

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @property
    def precision(self) -> str:
        """The compute precision as the manifest records it: fp32, bf16 or fp16."""
        return "fp32" if self.amp == "off" else self.amp


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    """The ``torch.device`` that ``cfg`` names, refusing one this machine does not have (one line)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = ("cuda" if count else "cpu") if cfg.device == "auto" else cfg.device
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if count == 0:
            raise GenddError(f"--device {cfg.device}: torch sees no CUDA device on this machine; use --device cpu "
                             "(or auto)")
        if index >= count:
            raise GenddError(f"--device {cfg.device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        name = f"cuda:{index}"
    device = torch.device(name)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise GenddError("--amp fp16: float16 autocast needs a CUDA device; use --amp bf16 on the CPU")
    return device


def rank_device(cfg: RuntimeConfig) -> torch.device:
    """The device of this process: `resolve_device`, where a torchrun rank given ``auto`` or ``cuda`` takes the GPU
    of its ``LOCAL_RANK``. One rank per GPU: a ``LOCAL_RANK`` beyond the node's GPUs, or one ``cuda:N`` named for
    several local ranks, is one line naming both numbers (a CPU device takes any number of ranks)."""
    device = resolve_device(cfg)
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    local, ranks = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cfg.device not in ("auto", "cuda"):  # one GPU named
        if ranks > 1:
            raise GenddError(f"--device {cfg.device}: names one GPU for the {ranks} ranks of this node; pass "
                             "--device cuda (each rank takes the GPU of its LOCAL_RANK) or --device cpu")
        return device
    count = torch.cuda.device_count()
    if local >= count:
        raise GenddError(f"LOCAL_RANK {local}: this node has {count} CUDA device(s) for its {ranks} ranks; start "
                         f"at most {count} per node (--nproc-per-node {count}) or pass --device cpu")
    return torch.device(f"cuda:{local}")


def precision_change(record: dict, cfg: RuntimeConfig) -> list[str]:
    """``["runtime.amp (TRAINED, not NOW)"]`` when a checkpoint's recorded config (``record``) was trained at
    another precision than ``cfg``'s: its optimizer and gradient-scaler state belong to that one, so a resume
    must keep it (its device, memory format and compilation may change)."""
    trained = record.get("runtime", {}).get("amp", "off")
    return [f"runtime.amp ({trained}, not {cfg.amp})"] if trained != cfg.amp else []


def fast_math(cfg: RuntimeConfig, device: torch.device) -> None:
    """A training loop's math on a CUDA device, with ``cfg.tf32``: TF32 matmuls and convolutions (float32 matmul
    precision ``high``) and cuDNN's autotuner, the speed a GPU user expects; without it IEEE float32 throughout.
    A no-op elsewhere. (Extraction keeps IEEE float32 unless ``amp`` says otherwise: the manifest's ``precision``
    names what made the stored bytes.)"""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if cfg.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if cfg.tf32 else "ieee"
        torch.backends.cudnn.benchmark = cfg.tf32


def place(model: torch.nn.Module, cfg: RuntimeConfig, device: torch.device) -> torch.nn.Module:
    """``model`` moved to ``device`` in the configured memory format (in place; returned for chaining)."""
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def compiled(fn, cfg: RuntimeConfig):
    """``fn`` (a module or a function) wrapped in ``torch.compile`` when ``cfg.compile`` asks for it."""
    return torch.compile(fn) if cfg.compile else fn


def to_device(images: torch.Tensor, cfg: RuntimeConfig, device: torch.device) -> torch.Tensor:
    """A batch of images moved to ``device`` (without blocking when it is pinned) in the configured format."""
    images = images.to(device, non_blocking=images.is_pinned())
    return images.contiguous(memory_format=torch.channels_last) if cfg.channels_last and images.ndim == 4 else images


def normalize_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> the float input timm's eval transform makes, on their device and in their
    memory format."""
    return normalize(pixels.float().div_(255), mean, std)


def network_input(pixels: torch.Tensor, data_config: dict, cfg: RuntimeConfig, device: torch.device) -> torch.Tensor:
    """A loader's uint8 pixels (B, 3, H, W) -> the network's normalized float input, moved as bytes and
    normalized on ``device``, in the configured memory format."""
    return normalize_pixels(to_device(pixels, cfg, device), data_config["mean"], data_config["std"])


def grad_scaler(cfg: RuntimeConfig, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of a training loop: active for fp16 (whose small gradients underflow), a
    pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")


def autocast(cfg: RuntimeConfig, device: torch.device):
    """A context running its body in the configured precision on ``device`` (a no-op for ``amp: off``)."""
    if cfg.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.amp])
