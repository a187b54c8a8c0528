"""DVC the DVC way: every dvc.yaml is current, its deps are what each stage imports, and seeds sweep through
``dvc exp run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from gendd_pipe.cli import app
from gendd_pipe.dvc_pipeline import code_deps, dvc_yaml, dvc_yaml_path
from gendd_pipe.recipe import SECTIONS
from tests.test_recipes import DVC, RECIPES, ROOT, _name, _sh, dvc_repository, localize


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_every_dvc_yaml_is_what_its_recipe_and_the_code_give(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = os.path.relpath(recipe, ROOT)
    with open(dvc_yaml_path(relative)) as f:
        assert f.read() == dvc_yaml(relative), f"run: gendd-pipe config dvc --config {relative}"
    result = CliRunner().invoke(app, ["config", "dvc", "--config", relative, "--check"])
    assert result.exit_code == 0 and "current" in result.output


LOADED = """
import json, sys
import stages.{stage}
from gendd_pipe.recipe import load_params, section
section(load_params("{recipe}"), "{stage}")  # what the stage loads before it runs: its module, its validation
print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values())
                        if (m.__name__.split(".")[0] in ("gendd_pipe", "stages")) and getattr(m, "__file__", None))))
"""


@pytest.mark.parametrize("stage", list(SECTIONS))
def test_deps_cover_every_module_a_stage_loads(stage, monkeypatch):
    """The import walk against Python itself: every project file loaded by the stage is a dep (a file or its
    folder)."""
    monkeypatch.chdir(ROOT)
    recipe = "pipelines/mnist5k-unsupervised/params.yaml" if stage == "probes" else "params.yaml"
    done = subprocess.run([sys.executable, "-c", LOADED.format(stage=stage, recipe=recipe)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    deps = code_deps(f"stages.{stage}")
    loaded = [os.path.relpath(p, ROOT) for p in json.loads(done.stdout)]
    missing = [p for p in loaded if not any(p == d or p.startswith(d + os.sep) for d in deps)]
    assert not missing, f"stage {stage} loads modules its deps lack: {missing}"
    assert "gendd_pipe/cli.py" not in deps  # a stage does not depend on the front end


@pytest.mark.slow
def test_seeds_sweep_through_dvc_experiments(tmp_path, digit_folder):
    """The embedded default under `dvc exp run`: a changed seed re-runs distill, evaluate and report only; a
    queued sweep of two seeds runs in the background queue's way and both show up in `dvc exp show`."""
    with open(os.path.join(ROOT, "params.yaml")) as f:
        params = yaml.safe_load(f)
    params["distill"]["runs"] = {"kd": {}}  # one run keeps the test short
    params, _ = localize(params, digit_folder)
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc_repository(repo, os.path.join(ROOT, "params.yaml"), params)
    _sh(repo, DVC, "repro")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "baseline")

    out = _sh(repo, DVC, "exp", "run", "-S", "distill.common.seed=1", "-n", "seed-1")
    for stage in ("prepare", "teacher", "extract"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Running stage 'distill@kd'" in out and "Running stage 'report'" in out
    _sh(repo, DVC, "exp", "run", "--queue", "-S", "distill.common.seed=2,3")
    _sh(repo, DVC, "exp", "run", "--run-all")
    experiments = _experiments(repo)
    assert sorted(e["params"]["distill"]["common"]["seed"] for e in experiments) == [1, 2, 3]
    assert all(e["metrics"]["data/distill/metrics/kd.json"]["last"]["epoch"] == 1 for e in experiments)


def _experiments(repo) -> list[dict]:
    """The experiments of `dvc exp show --json`, each with its params and metrics."""
    done = subprocess.run([DVC, "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, timeout=300)
    raw = json.loads(done.stdout)
    found = []
    for commit in raw:
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                found.append({"params": data["params"]["params.yaml"]["data"],
                              "metrics": {k: v["data"] for k, v in (data.get("metrics") or {}).items()}})
    return found
