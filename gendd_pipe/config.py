"""Config dicts (params.yaml sections, checkpoint records) -> the library's frozen dataclasses."""

from __future__ import annotations

import dataclasses
import json
import typing

from gendd_pipe.errors import GenddError


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
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise GenddError(f"params {where or cls.__name__}: {exc}") from exc


def differences(ours, theirs: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Top-level fields where dataclass ``ours`` and a recorded config dict disagree (sorted)."""
    mine = dataclasses.asdict(ours)
    text = lambda v: json.dumps(v, sort_keys=True, default=list)  # noqa: E731  (tuples and lists compare equal)
    return sorted(k for k in mine.keys() | theirs.keys() if k not in ignore and text(mine.get(k)) != text(theirs.get(k)))
