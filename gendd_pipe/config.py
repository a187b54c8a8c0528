"""Typed configs: frozen dataclasses validated by pydantic, one line per error that names the key path.

Every settings class of the project is a `configclass`: a frozen dataclass whose
fields carry their types and ranges (``Annotated[int, Field(ge=1)]``), so that
params.yaml, ``--set`` overrides, CLI options and checkpoint records are
validated alike. Values are coerced where YAML is ambiguous (``2e-3`` reads as
a string; the field makes it a float), unknown keys are refused with the
nearest known key, and `parse` raises a `ConfigError` such as
``distill.runs.kd.logit.temperature: must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from gendd_pipe.errors import GenddError

configclass = partial(_pydantic_dataclass, frozen=True, config=ConfigDict(extra="forbid"))
"""Decorator of every settings class: a frozen dataclass that validates its fields and refuses unknown keys."""

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


def _ordered(pair: tuple) -> tuple:
    if pair[0] > pair[1]:
        raise ValueError("must be a range [low, high] with low <= high")
    return pair


Range = Annotated[tuple[PositiveFloat, PositiveFloat], AfterValidator(_ordered)]
"""Two positive numbers, low then high: ``[0.08, 1.0]``."""


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _output_dir(path: str) -> str:
    if "://" not in path:  # URLs are checked by the store that opens them
        found = _nearest_existing(path)
        if not os.path.isdir(found):
            where = "is a regular file" if found == os.path.abspath(path) else f"lies below the regular file {found}"
            raise ValueError(f"{where}; give a directory")
    return path


def _output_file(path: str) -> str:
    if "://" not in path:
        if os.path.isdir(path):
            raise ValueError("is a directory; give a file name")
        _output_dir(os.path.dirname(os.path.abspath(path)))
    return path


RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"


def _run_name(name: str) -> str:
    if not re.fullmatch(RUN_NAME, name):
        raise ValueError("a run name is letters, digits, _ . - (it names a directory)")
    return name


RunName = Annotated[str, AfterValidator(_run_name)]
"""A run's name: a directory name and a DVC stage key, so letters, digits, ``_ . -`` and no path."""
OutputDir = Annotated[str, AfterValidator(_output_dir)]
"""A directory to write (or a URL): checked before any work, so a path that is a file fails at once."""
OutputFile = Annotated[str, AfterValidator(_output_file)]
"""A file to write (or a URL), not a directory and not below a regular file."""
Shards = Annotated[tuple[str, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v), Field(min_length=1)]
"""Shard paths, brace patterns, globs or URLs: one string or a list of them."""


class ConfigError(GenddError):
    """A setting that does not validate: ``where.key.path: reason``.

    Attributes:
        where: the key path of the validated mapping (``distill.runs.kd``) or a file name.
        loc: the key path inside it, as a tuple.
        reason: what is wrong, ending with the value given where there is one.
    """

    def __init__(self, where: str, loc: tuple, reason: str):
        self.where, self.loc, self.reason = where, tuple(loc), reason
        super().__init__(f"{join_key(where, *loc)}: {reason}")


def join_key(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def _unwrap(hint):
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return hint


def field_types(cls) -> dict[str, Any]:
    """Field name -> type (unwrapped) of a config class."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _unwrap(hints[f.name]) for f in dataclasses.fields(cls)}


def type_at(cls, loc: tuple):
    """The type a key path leads to inside config class ``cls`` (None when it leads nowhere known)."""
    hint = cls
    for key in loc:
        hint = _unwrap(hint)
        if dataclasses.is_dataclass(hint):
            hint = field_types(hint).get(key)
        elif typing.get_origin(hint) in (dict, Mapping):
            hint = typing.get_args(hint)[1]
        else:
            return None
    return _unwrap(hint)


def default_of(cls, path: str):
    """The default of the key ``path`` (``views.scale``) of config class ``cls``; MISSING when it has none (or
    lies inside a section that is None by default)."""
    value, hint = dataclasses.MISSING, cls
    for key in path.split("."):
        if value is None:
            return dataclasses.MISSING
        if value is not dataclasses.MISSING:
            value = getattr(value, key)
            continue
        f = {f.name: f for f in dataclasses.fields(hint)}[key]
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        hint = field_types(hint)[key]
    return to_dict(value) if value is not dataclasses.MISSING else value


def unknown_key(key: str, known) -> str:
    """``unknown key (did you mean 'x'?; known: a, b)``."""
    known = sorted(known)
    near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}?; " if near else ""
    return f"unknown key ({hint}known: {', '.join(known)})"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reason(error: dict, cls) -> str:
    kind, ctx, loc = error["type"], error.get("ctx") or {}, error["loc"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = type_at(cls, loc[:-1])
        return unknown_key(loc[-1], field_types(parent)) if dataclasses.is_dataclass(parent) else "unknown key"
    if kind in ("missing", "missing_argument", "missing_keyword_argument"):
        return "required, but not given"
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        reason = "must be " + bounds[kind].format(**{k: f"{v:g}" for k, v in ctx.items()})
    elif kind == "literal_error":
        reason = f"must be one of {ctx['expected']}"
    elif kind.startswith(("int_", "float_", "bool_", "string_", "list_", "tuple_", "dict_", "dataclass_")):
        noun = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                "list": "a list", "tuple": "a list", "dict": "a mapping", "dataclass": "a mapping"}
        reason = f"must be {noun[kind.split('_')[0]]}"
    elif kind in ("too_short", "too_long"):
        reason = error["msg"].replace("Tuple", "list").replace("List", "list").split(" after validation")[0].lower()
        reason = reason[0].lower() + reason[1:]
    else:  # a validator's own ValueError, and anything rarer
        reason = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return f"{reason}, got {_short(error['input'])}" if "input" in error and not isinstance(
            error["input"], (dict, Mapping)) else reason
    return f"{reason}, got {_short(error['input'])}"


def _located(loc: tuple) -> tuple:
    """Pydantic locations without the tags it adds for union members and validator wrappers."""
    return tuple(part for part in loc if isinstance(part, int)
                 or not str(part).startswith(("function-", "union[")) and part != "[key]")


def _tuple_length(hint) -> int | None:
    """The item count of a fixed-length tuple type (``tuple[float, float]``: 2); None for any other type."""
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    return len(args) if args and Ellipsis not in args else None


@lru_cache(maxsize=None)
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def parse(cls, data, where: str = ""):
    """Validate mapping ``data`` into config class ``cls``.

    Raises:
        ConfigError: for the first problem (wrong type, out of range, unknown or missing key), naming its key
            path under ``where``; the count of further problems is added to the reason.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(where, (), f"must be a mapping of keys, got {_short(data)}")
    try:
        return _adapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        errors = [{**e, "loc": _located(e["loc"])} for e in exc.errors()]
        first = errors[0]
        loc, reason = first["loc"], _reason(first, cls)
        if first["type"] == "missing" and loc and isinstance(loc[-1], int):  # a list too short for its tuple
            loc, reason = loc[:-1], f"needs {_tuple_length(type_at(cls, loc[:-1])) or loc[-1] + 1} items"
        reason += f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(where, loc, reason) from None


def to_dict(obj) -> Any:
    """A config as plain YAML/JSON data (tuples as lists, nested configs as mappings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def narrow(obj, cls):
    """The ``cls`` part of ``obj``, a config of a subclass of ``cls`` (a stage section -> its library config)."""
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})


def merged(base: Mapping, override: Mapping) -> dict:
    """``base`` with ``override`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in (override or {}).items():
        old = out.get(key)
        out[key] = merged(old, value) if isinstance(value, Mapping) and isinstance(old, Mapping) else value
    return out


def parse_set(text: str) -> tuple[list[str], Any]:
    """``KEY.PATH=VALUE`` -> (key path, value read as YAML: ``2e-3``, ``[0.5, 1]``, ``true``, ``null``)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise GenddError(f"--set {text!r}: expected KEY.PATH=VALUE, such as distill.common.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise GenddError(f"--set {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return path, value


def set_key(params: dict, path: list[str], value, _done: tuple[str, ...] = ()) -> dict:
    """``params`` with ``value`` at key ``path`` (mappings are created on the way; a scalar in the way is an error)."""
    out = dict(params)
    head, rest = path[0], path[1:]
    if not rest:
        out[head] = value
        return out
    child = out.get(head)
    if child is None:
        child = {}
    if not isinstance(child, Mapping):
        raise GenddError(f"--set {'.'.join((*_done, *path))}: {join_key(*_done, head)} holds {_short(child)}, "
                         "not a mapping of keys")
    out[head] = set_key(dict(child), rest, value, (*_done, head))
    return out


def apply_sets(params: dict, sets: list[str]) -> dict:
    """Apply ``--set KEY.PATH=VALUE`` overrides in order."""
    for text in sets or []:
        path, value = parse_set(text)
        params = set_key(params, path, value)
    return params


def differences(ours: Mapping, theirs: Mapping, ignore: tuple[str, ...] = ()) -> list[str]:
    """Top-level keys where two config records disagree (sorted)."""
    text = lambda v: json.dumps(v, sort_keys=True, default=list)  # noqa: E731  (tuples and lists compare equal)
    return sorted(k for k in ours.keys() | theirs.keys() if k not in ignore and text(ours.get(k)) != text(theirs.get(k)))
