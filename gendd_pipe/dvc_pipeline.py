"""The DVC pipeline of a recipe: its dvc.yaml, written from the recipe itself (``gendd-pipe config dvc``).

Stages are the recipe's sections, in `SECTIONS` order; each runs ``python -m
stages.NAME`` on the recipe's params file from the repository root. Outputs,
metrics and plots are the paths of `gendd_pipe.layout`, written with DVC's
``${...}`` interpolation of the params, so editing a path in params.yaml needs
no new dvc.yaml, and the runs of ``distill`` and ``evaluate`` are ``foreach``
over ``distill.runs``, so adding a run needs none either. ``deps`` are the
stage's entry point and every project module it imports, found by walking the
imports (a package whose modules load as plug-ins is listed whole), plus the
data it reads; outputs that resume (a distill run, the fine-tuned teacher) are
``persist: true``. ``tests/test_dvc.py`` checks that every committed dvc.yaml is
what this module writes, so the lists cannot drift from the code.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import pkgutil
import sys

from gendd_pipe.distill.methods import base as methods_base
from gendd_pipe.errors import GenddError
from gendd_pipe.files import dump_yaml
from gendd_pipe.layout import METRICS, MODEL, REPORT, eval_result, run_dir, run_metrics, run_plot
from gendd_pipe.recipe import SECTIONS, load_params, section

PROJECT = ("gendd_pipe", "stages")
PLUGIN_PACKAGES = (methods_base.__package__,)  # imported module by module at run time
HEADER = ("# Written by `gendd-pipe config dvc --config {params}` from the recipe; edit the recipe and run that\n"
          "# again (tests/test_dvc.py checks this file is current).\n")


def project_root() -> str:
    """The repository (the folder of the stages package): the current directory, or on sys.path already."""
    if os.path.isfile(os.path.join("stages", "__init__.py")) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    spec = importlib.util.find_spec("stages")
    if spec is None or not spec.submodule_search_locations:
        raise GenddError("the stages package is not importable: run from the repository root")
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def _source(module: str) -> str | None:
    """The file of a project module; None for a name that is no module (a function imported from one)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, AttributeError):  # ``pkg.module.function``: the parent is no package
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imports(module: str, path: str) -> set[str]:
    """Project modules named by the import statements of one file (in functions too), with their packages."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT and _source(name):
                parts = name.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if _source(".".join(parts[:i])))
    return found


def imported_modules(entry: str) -> set[str]:
    """Every project module that importing ``entry`` (``stages.distill``) may import, ``entry`` included."""
    parts = entry.split(".")
    seen, todo = set(), [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # its packages run first
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += sorted(_imports(module, _source(module)) - seen)
        if module in PLUGIN_PACKAGES:  # its modules load one by one at run time: walk them all
            folder = os.path.dirname(_source(module))
            todo += [f"{module}.{m.name}" for m in pkgutil.iter_modules([folder])]
    return seen


def code_deps(entry: str) -> list[str]:
    """The files (and plug-in package folders) of the modules ``entry`` imports, relative to the repository."""
    root, deps = project_root(), set()  # first: it makes the stages package importable
    for module in imported_modules(entry):
        package = next((p for p in PLUGIN_PACKAGES if module == p or module.startswith(p + ".")), None)
        path = os.path.dirname(_source(package + ".__init__") or "") if package else _source(module)
        deps.add(os.path.relpath(path, root))
    return sorted(deps)


def data_dirs(patterns) -> list[str]:
    """The local directories shard patterns read from (URLs and paths outside the repository are not deps)."""
    dirs = set()
    for pattern in patterns or ():
        if "://" in pattern or os.path.isabs(pattern):
            continue
        head = pattern
        while glob.has_magic(head) or "{" in head:
            head = os.path.dirname(head)
        dirs.add(head if head != pattern else os.path.dirname(pattern) or ".")
    return sorted(dirs)


def _local_file(path: str | None) -> list[str]:
    return [path] if path and "://" not in path and ":" not in path and path not in ("none", "pretrained") else []


def _stage(name: str, params_ref, keys: list[str], deps: list[str], run: bool = False,
           runs: list[str] | None = None, **outputs) -> dict:
    """A stage running ``stages/NAME.py``; with ``run``, one per run of ``distill.runs`` (``${key}``), or with
    ``runs`` one per run named there (``${item}``)."""
    key = " ${key}" if run else " ${item}" if runs else ""
    stage = {"cmd": f"python -m stages.{name}{key}{params_ref['arg']}", "deps": code_deps(f"stages.{name}") + deps,
             "params": [{params_ref["file"]: keys}] if params_ref["file"] else keys}
    if params_ref["wdir"]:
        stage = {"wdir": params_ref["wdir"], **stage}
    stage.update({kind: paths for kind, paths in outputs.items() if paths})
    if runs:
        return {"foreach": runs, "do": stage}
    return {"foreach": "${distill.runs}", "do": stage} if run else stage


def pipeline(params_path: str) -> dict:
    """The dvc.yaml (as data) of the recipe at ``params_path``, relative to the repository root."""
    params = load_params(params_path)
    root_params = os.path.normpath(params_path) == "params.yaml"
    where = os.path.dirname(params_path)
    ref = {"file": None if root_params else params_path, "arg": "" if root_params else f" --params {params_path}",
           "wdir": None if root_params else os.path.relpath(".", where)}
    cfg = {name: section(params, name, params_path) for name in SECTIONS if name in params}
    uncached = {"cache": False}
    stages = {}
    if "prepare" in cfg:
        c = cfg["prepare"]
        stages["prepare"] = _stage("prepare", ref, ["prepare"], (
            [] if c.dataset in ("mnist5k", "fashion-mnist") else ["${prepare.dataset}"]),
                                   outs=["${prepare.out}"])
    if "teacher" in cfg:
        c = cfg["teacher"]
        stages["teacher"] = _stage(
            "teacher", ref, ["teacher"], data_dirs(c.shards + c.val_shards) + _local_file(c.teacher.weights),
            outs=[{f"${{teacher.out}}/{MODEL}": {"persist": True}}],
            metrics=[{f"${{teacher.out}}/{METRICS}": uncached}])
    if "extract" in cfg:
        c = cfg["extract"]
        stages["extract"] = _stage("extract", ref, ["extract"], data_dirs(c.shards) + _local_file(c.teacher.weights),
                                   outs=["${extract.out}"],
                                   metrics=[{"${extract.metrics}": uncached}] if c.metrics else [])
    if "probes" in cfg:
        c = cfg["probes"]
        stages["probes"] = _stage("probes", ref, ["probes"], data_dirs(c.shards + c.val_shards) + [c.store],
                                  metrics=[{"${probes.out}": uncached}])
    if "distill" in cfg:
        stages.update(_distill_stages(cfg["distill"], ref))
    if "evaluate" in cfg:
        c = cfg["evaluate"]
        stages["evaluate"] = _stage(
            "evaluate", ref, ["evaluate"], data_dirs(c.val_shards + (c.train_shards or ()))
            + [run_dir("${evaluate.distill}", "${key}")], run=True,
            metrics=[{eval_result("${evaluate.out}", "${key}"): uncached}])
    if "report" in cfg:
        c = cfg["report"]
        reads = [os.path.dirname(run_metrics("${report.distill}", "x")), "${report.evaluate}"]
        reads += ["${report.teacher}"] * bool(c.teacher) + ["${report.references}"] * bool(c.references)
        images = [name for name in REPORT if name.endswith(".png")]  # cached; the table and its JSON go to git
        stages["report"] = _stage("report", ref, ["report", "distill.runs"], reads,
                                  outs=[f"${{report.out}}/{n}" for n in images]
                                  + [{f"${{report.out}}/{n}": uncached} for n in REPORT if n not in images])
    out = {"stages": stages}
    if "distill" in cfg:  # top-level plots take no ${...}: literal paths
        out["plots"] = [{"val_top1_per_epoch": {"template": "linear", "x": "epoch", "y": _curves(cfg["distill"])}}]
        if "report" in cfg:
            out["plots"] += [os.path.join(cfg["report"].out, n) for n in REPORT if n.endswith(".png")]
    return out


def _distill_stages(c, ref) -> dict:
    """One ``distill`` stage per run (``foreach``). Runs that name a live teacher depend on its weights, not on
    the store: they are the ``distill-live`` stages, and the others, listed by name, the ``distill`` ones."""
    live = [name for name in c.runs if c.run(name).teacher is not None]
    cached = [name for name in c.runs if name not in live]
    common = [f"distill.{k}" for k in ("shards", "val_shards", "out", "common")]
    data = data_dirs(c.shards + c.val_shards)

    def group(var: str, keys: list[str], deps: list[str], **each) -> dict:
        return _stage("distill", ref, keys + [f"distill.runs.{var}"], data + deps, **each,
                      outs=[{run_dir("${distill.out}", var): {"persist": True}}],
                      metrics=[{run_metrics("${distill.out}", var): uncached}],
                      plots=[{run_plot("${distill.out}", var): uncached}])

    uncached = {"cache": False}
    if not live:
        return {"distill": group("${key}", ["distill.store", *common], _local_file(c.store), run=True)}
    weights = sorted({path for name in live for path in _local_file(c.run(name).teacher.weights)})
    stages = {"distill": group("${item}", ["distill.store", *common], _local_file(c.store), runs=cached)} if cached else {}
    stages["distill-live"] = group("${item}", common, weights, runs=live)
    return stages


def _curves(distill) -> dict:
    """Per run, the columns of its plots CSV: the method's predictors, or the probe of an unsupervised run."""
    curves = {}
    for name in distill.runs:
        run = distill.run(name)
        predictors = list(methods_base.get_method(run.method).predictors)
        predictors = ["probe"] if run.unsupervised else predictors + ["probe"] * bool(run.with_probe)
        curves[run_plot(distill.out, name)] = predictors if len(predictors) > 1 else predictors[0]
    return curves


def dvc_yaml(params_path: str) -> str:
    """The text of the recipe's dvc.yaml."""
    return HEADER.format(params=params_path) + dump_yaml(pipeline(params_path))


def dvc_yaml_path(params_path: str) -> str:
    return os.path.join(os.path.dirname(params_path), "dvc.yaml")

