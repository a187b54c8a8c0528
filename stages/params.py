"""Reading params.yaml sections and writing a stage's resolved config and metrics.

Every stage runs as ``python -m stages.<stage> [RUN] [--params FILE]``: RUN names
one entry of a ``foreach`` stage (a distill run), FILE is the recipe's params
(default ``params.yaml``, the embedded default).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import yaml

from gendd_pipe.errors import GenddError


def stage_args(stage: str, with_run: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    if with_run:
        parser.add_argument("run", help="the run to execute (a key of distill.runs)")
    parser.add_argument("--params", default="params.yaml", help="the recipe's params file")
    return parser.parse_args()


def load_section(section: str, path: str = "params.yaml") -> dict:
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise GenddError(f"{path}: no '{section}' section")
    return params[section]


def merged(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_config(distill: dict, run: str, path: str = "params.yaml") -> dict:
    """The DistillConfig fields of one run: ``distill.common`` under ``distill.runs[run]``; the method defaults
    to the run's name."""
    runs = distill.get("runs") or {}
    if run not in runs:
        raise GenddError(f"{path}: no run {run!r} under distill.runs (have: {', '.join(runs) or 'none'})")
    return merged({"method": run, **(distill.get("common") or {})}, runs[run] or {})


def write_json(path: str, data: dict) -> None:
    """Write a stage's resolved config or metrics next to its outputs."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
        f.write("\n")
