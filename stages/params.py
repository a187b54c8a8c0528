"""Reading params.yaml sections and writing a stage's resolved config and metrics."""

from __future__ import annotations

import dataclasses
import json
import os

import yaml

from gendd_pipe.errors import GenddError


def load_section(section: str, path: str = "params.yaml") -> dict:
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise GenddError(f"{path}: no '{section}' section")
    return params[section]


def write_json(path: str, data: dict) -> None:
    """Write a stage's resolved config or metrics next to its outputs."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
        f.write("\n")
