"""Reading and writing the small files stages leave next to their outputs: JSON, YAML, on any fsspec path.

Writes go to a temporary file that is then renamed where the filesystem can
rename (local paths), so a killed stage never leaves half a metrics file.
"""

from __future__ import annotations

import json
import os

import fsspec
import yaml


def _write_text(path: str, text: str) -> None:
    if "://" in path:  # object stores: one PUT is atomic
        with fsspec.open(path, "w") as f:
            f.write(text)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_yaml(path: str, data) -> None:
    _write_text(path, dump_yaml(data))


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a value written twice is written out twice, never as &id001
        return True


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def read_yaml(path: str) -> dict:
    with fsspec.open(path, "r") as f:
        return yaml.safe_load(f) or {}
