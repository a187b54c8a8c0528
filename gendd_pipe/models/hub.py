"""Models by any name timm takes, with one-line errors for names it cannot build.

timm names a model as ``resnet50`` (the architecture), ``resnet50.a1_in1k`` (with a
pretrained tag), ``hf-hub:org/model`` (a Hugging Face hub repository holding
``config.json`` and weights) or ``local-dir:PATH`` (such a repository on disk).
`create_model` builds any of them through ``timm.create_model``. The hub is used
when it is reachable; offline (or with ``HF_HUB_OFFLINE=1``) a name that needs it
fails with one line that says which name could not be fetched and how to pass
local weights instead.
"""

from __future__ import annotations

import timm
import torch
from timm.models import parse_model_name

from gendd_pipe.errors import GenddError


def architecture(name: str) -> str:
    """The timm architecture of a name without a source prefix: ``resnet50.a1_in1k`` -> ``resnet50``."""
    return name.split(".")[0]


def create_model(name: str, role: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; ``role`` (teacher, student) words the errors.

    Raises:
        GenddError: an unknown name, an unknown pretrained tag, or a hub name that cannot be fetched.
    """
    try:
        source, _ = parse_model_name(name)
    except ValueError:  # 'org/model' without a prefix
        raise GenddError(f"{role} model {name!r}: a hub repository is named hf-hub:{name}, a local one "
                         f"local-dir:{name}") from None
    if source is None and not timm.is_model(architecture(name)):
        raise GenddError(f"unknown {role} model {name!r}: not a timm model name (see timm.list_models())")
    try:
        return timm.create_model(name, **kwargs)
    except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError, a missing local-dir config
        if source == "local-dir":
            raise GenddError(f"{role} model {name!r}: {str(exc).splitlines()[0]}") from exc
        raise GenddError(f"{role} model {name!r}: cannot fetch it from the Hugging Face hub (offline, or "
                         f"HF_HUB_OFFLINE=1); name the architecture ({architecture(name.split(':')[-1].split('/')[-1])}) "
                         "with weights: PATH to a local state dict or .safetensors file, or local-dir:PATH for a "
                         "downloaded hub repository") from exc
    except RuntimeError as exc:  # an unknown pretrained tag, a wrong argument for this model
        raise GenddError(f"{role} model {name!r}: {str(exc).splitlines()[0]}") from exc
