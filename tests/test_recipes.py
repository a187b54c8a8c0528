"""Every recipe under pipelines/ runs through the CLI (``--config``) and through ``dvc repro``, alike.

The recipe's own settings are kept (models, input sizes, head size, views, logits,
output paths); only what scales with the data or the compute is cut down (epochs,
batch size, workers, view count, GenDD's sampling steps, samples and
``diffusion_batch_mul``; bf16 autocast, a GPU's speed-up that a CPU without bf16
units emulates; the ce, dkd and gdkd runs of a recipe that has a kd run), weights become ``none`` (random init, no download), and
the image shards are a tiny ImageFolder of MNIST digits written on the fly. Every
recipe as written is validated by ``tests/test_config.py``. Each recipe runs once
stage by stage through ``gendd-pipe ... --config`` and once through ``dvc repro``
of its committed dvc.yaml in a fresh git + DVC repository; every stage must write
the same resolved config in both.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from gendd_pipe.cli import app
from gendd_pipe.dvc_pipeline import dvc_yaml_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "pipelines", "*", "params.yaml")) if not os.path.islink(p))
RECIPES.append(os.path.join(ROOT, "params.yaml"))  # the embedded default (pipelines/mnist5k links to it)
SHARD_KEYS = ("shards", "val_shards", "train_shards")
CUT_DOWN = {"sampling_steps": 4, "diffusion_batch_mul": 2, "samples": 1}  # GenDD's cost knobs, wherever they are
LIKE_KD = ("ce", "dkd", "gdkd")  # logit runs resolved and run by the same code as a recipe's kd run (each method
# trains in tests/test_distill.py), left out here: a DVC stage process costs 8-15 s to start
DVC = os.path.join(os.path.dirname(sys.executable), "dvc")


def _name(recipe: str) -> str:
    folder = os.path.relpath(os.path.dirname(recipe), ROOT)
    return "mnist5k" if folder == "." else folder.removeprefix("pipelines/")


def test_the_recipes_are_all_there():
    assert {_name(p) for p in RECIPES} >= {"mnist5k", "mnist5k-unsupervised", "imagenet-r34-r18",
                                           "imagenet-r50-mobilenet", "imagenet-beitl-r50", "cc3m-unsupervised-r34-r18",
                                           "cifar100-r50-r18"}


def localize(params: dict, folder: str) -> tuple[dict, dict | None]:
    """Recipe params cut down as the module says, paths kept as the recipe has them (relative, under data/); and
    for a recipe without a prepare stage, the prepare settings of the shards it reads."""
    shards = params.get("prepare", {}).get("out", "data/shards")

    def walk(node, key=""):
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if key in SHARD_KEYS and any("://" in p for p in node):
            split = "val" if key == "val_shards" else "train"
            return [f"{shards}/{split}-*.tar"]
        if key in CUT_DOWN:
            return min(node, CUT_DOWN[key])
        return node

    params = walk(params)
    if any("://" in p for p in params["extract"]["shards"]):
        params["extract"]["shards"] = [f"{shards}/train-*.tar", f"{shards}/val-*.tar"]
    prepare = {"dataset": folder, "out": shards, "val_fraction": 0.25, "shard_size": 8, "seed": 0}
    if "teacher" in params:
        params["teacher"].update(epochs=min(params["teacher"].get("epochs", 2), 1), batch_size=4)
        params["teacher"]["teacher"]["weights"] = "none"
    if not params["extract"]["teacher"]["weights"].endswith(".safetensors"):
        params["extract"]["teacher"]["weights"] = "none"
    params["extract"].update(batch_size=8, dask_workers=0)
    params["extract"]["views"]["count"] = min(params["extract"]["views"].get("count", 4), 2)
    for run in params["distill"]["runs"].values():
        gendd = run.get("gendd", {})
        run["epochs"] = 2 if gendd.get("stage1_epochs") else 1
        if gendd.get("stage1_epochs"):
            gendd["stage1_epochs"] = 1
    runs = params["distill"]["runs"]
    if any((run or {}).get("method", name) == "kd" for name, run in runs.items()):
        params["distill"]["runs"] = {name: run for name, run in runs.items()
                                     if (run or {}).get("method", name) not in LIKE_KD}
    params["distill"]["common"].update(warmup_epochs=0, loader={"batch_size": 4, "num_workers": 0})
    params["evaluate"]["batch_size"] = 8
    for section in (params["distill"]["common"], params["evaluate"]):  # bf16 autocast is a GPU's speed-up: on
        section.get("runtime", {}).pop("amp", None)  # this CPU it costs time (`tests/test_distill.py` trains bf16)
    if "prepare" in params:
        return {**params, "prepare": prepare}, None
    return params, prepare


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def run_by_cli(params_file: str, params: dict) -> None:
    """Every stage of the recipe through `gendd-pipe NAME --config params_file`, in the current directory."""
    for stage in ("prepare", "teacher", "extract", "probes"):
        if stage in params:
            _invoke(stage, "--config", params_file, "-q")
    for run in params["distill"]["runs"]:
        _invoke("distill", "--config", params_file, "--run", run, "-q")
        _invoke("evaluate", "--config", params_file, "--run", run, "-q")
    _invoke("report", "--config", params_file, "-q")


def _sh(cwd, *cmd, timeout=900):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@contextlib.contextmanager
def _sh_beside(cwd, *cmd, timeout=900):
    """``cmd`` run in the background (one thread per torch pool) while the block runs; it must then end with 0."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    log = os.path.join(os.path.dirname(cwd), f"{os.path.basename(cwd)}.log")
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:  # the block failed, or the command outlived its timeout
                proc.kill()
                proc.wait()
    output = open(log).read()
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{output[-3000:]}"


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads in this process set to ``count`` for the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dvc_repository(path, recipe: str, params: dict) -> str:
    """A git + DVC repository holding the project's code, the recipe's committed dvc.yaml and ``params``."""
    shutil.copytree(os.path.join(ROOT, "gendd_pipe"), path / "gendd_pipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "stages"), path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    relative = os.path.relpath(recipe, ROOT)
    os.makedirs(path / os.path.dirname(relative), exist_ok=True)
    shutil.copy(dvc_yaml_path(recipe), path / dvc_yaml_path(relative))
    (path / relative).write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(path, "git", "init", "-q")
    _sh(path, DVC, "init", "-q")
    _sh(path, DVC, "config", "core.analytics", "false")
    return relative


def resolved_configs(root) -> dict[str, str]:
    """Every config.yaml a stage wrote under ``root/data``, by relative path."""
    found = glob.glob(os.path.join(root, "data", "**", "*config.yaml"), recursive=True)
    return {os.path.relpath(p, root): open(p).read() for p in found}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_a_recipe_runs_alike_through_the_cli_and_dvc(recipe, tmp_path, digit_folder, monkeypatch):
    with open(recipe) as f:
        params, shards = localize(yaml.safe_load(f), digit_folder)  # shards: made first, without prepare

    cli = tmp_path / "cli"
    cli.mkdir()
    monkeypatch.chdir(cli)
    (cli / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if shards:
        _invoke("prepare", "--dataset", shards["dataset"], "--out", shards["out"], "--shard-size", 8,
                "--val-fraction", 0.25, "-q")

    repo = tmp_path / "dvc"
    repo.mkdir()
    relative = dvc_repository(repo, recipe, params)
    if shards:
        shutil.copytree(cli / shards["out"], repo / shards["out"])
    # `dvc repro` in its own processes while the CLI runs the stages here: one core each
    with _sh_beside(repo, DVC, "repro", dvc_yaml_path(relative)), torch_threads(1):
        run_by_cli("params.yaml", params)
        out = params["report"]["out"]
        table = open(os.path.join(out, "results.md")).read()
        assert all(f"| {name} |" in table for name in params["distill"]["runs"])
        assert {"results.md", "results.json", "accuracy.png", "comparison.png"} <= set(os.listdir(out))
        assert Image.open(os.path.join(out, "accuracy.png")).size[0] > 100
    by_cli, by_dvc = resolved_configs(cli), resolved_configs(repo)
    if shards:  # made by hand beside the recipe, not by a stage of it
        by_cli.pop(os.path.join(shards["out"], "config.yaml")), by_dvc.pop(os.path.join(shards["out"], "config.yaml"))
    assert by_cli and by_cli == by_dvc
    assert open(repo / out / "results.md").read().splitlines()[0] == table.splitlines()[0]
    shutil.rmtree(tmp_path)  # a passing run's checkpoints (GBs for the full-size recipes); pytest keeps three trees
