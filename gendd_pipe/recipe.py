"""A recipe: the params.yaml that dvc.yaml, the stages and the CLI share, validated section by section.

A recipe has one section per stage (`SECTIONS`); each is a `configclass` defined
beside the code of its stage and imported only when that section is read, so a
DVC stage imports its own code alone (and its ``deps`` list stays exact).
`load_params` reads a params file and applies ``--set KEY.PATH=VALUE``
overrides; `section` validates one section; `stage_main` is the entry point of
every ``python -m stages.NAME`` that dvc.yaml runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
from collections.abc import Callable

import yaml

from gendd_pipe.config import apply_sets, parse, unknown_key
from gendd_pipe.errors import GenddError, one_line_errors
from gendd_pipe.logs import setup_logging

log = logging.getLogger(__name__)

SECTIONS = {  # section -> (module, class)
    "prepare": ("gendd_pipe.data.prepare", "PrepareStage"),
    "teacher": ("gendd_pipe.finetune", "TeacherStage"),
    "extract": ("gendd_pipe.extract", "ExtractStage"),
    "probes": ("gendd_pipe.distill.probe", "ProbesStage"),
    "distill": ("gendd_pipe.distill.stage", "DistillStage"),
    "evaluate": ("gendd_pipe.distill.evaluate", "EvaluateStage"),
    "report": ("gendd_pipe.report", "ReportStage"),
}


def section_class(name: str) -> type:
    """The config class of section ``name``."""
    module, cls = SECTIONS[name]
    return getattr(importlib.import_module(module), cls)


def stage_runner(name: str) -> Callable:
    """The ``run_stage`` of stage ``name``, beside its config class."""
    return importlib.import_module(SECTIONS[name][0]).run_stage


def load_params(path: str | None, sets: list[str] = ()) -> dict:
    """The params of a recipe file (None: no file, defaults only) with ``--set`` overrides applied."""
    params = {}
    if path is not None:
        try:
            with open(path) as f:
                params = yaml.safe_load(f)
        except FileNotFoundError:
            raise GenddError(f"{path}: no such params file") from None
        except yaml.YAMLError as exc:
            raise GenddError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise GenddError(f"{path}: must be a mapping of stage sections, not {type(params).__name__}")
    params = apply_sets(params, sets)
    for key in params:
        if key not in SECTIONS:
            raise GenddError(f"{path or '--set'}: {key}: {unknown_key(key, SECTIONS)}")
    return params


def section(params: dict, name: str, where: str = "params.yaml"):
    """Validate section ``name`` of ``params`` into its config class."""
    if name not in params:
        raise GenddError(f"{where}: no '{name}' section")
    cls = section_class(name)
    data = params[name] or {}
    defaults = getattr(cls, "defaults_from", None)  # settings a section takes from others (the report's runs)
    return parse(cls, {**defaults(params), **data} if defaults else data, name)


def stage_main(name: str, run_stage: Callable) -> None:
    """``python -m stages.NAME [RUN] [--params FILE] [--set KEY.PATH=VALUE ...]``: validate, then run the stage.

    Errors a user can cause print one line and exit 1. Logs are plain timestamped lines when output is not a
    terminal (under ``dvc repro``).
    """
    with_run = "run" in inspect.signature(run_stage).parameters
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=run_stage.__doc__)
    if with_run:
        parser.add_argument("run", help="the run (a key of distill.runs)")
    parser.add_argument("--params", default="params.yaml", help="the recipe's params file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a param")
    args = parser.parse_args()
    setup_logging()
    with one_line_errors():
        cfg = section(load_params(args.params, args.set), name, args.params)
        log.info("stage %s%s of %s", name, f"@{args.run}" if with_run else "", os.path.abspath(args.params))
        run_stage(cfg, args.run) if with_run else run_stage(cfg)
