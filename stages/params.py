"""params.yaml sections -> the library's frozen config dataclasses (nested, tuples from lists)."""

from __future__ import annotations

import dataclasses
import json
import os
import typing

import yaml

from gendd_pipe.errors import GenddError


def load_section(section: str, path: str = "params.yaml") -> dict:
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise GenddError(f"{path}: no '{section}' section")
    return params[section]


def build(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise GenddError(f"params {where or cls.__name__}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = build(hint, value or {}, f"{where}.{name}" if where else name)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def write_json(path: str, data: dict) -> None:
    """Write a stage's resolved config or metrics next to its outputs."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
        f.write("\n")
