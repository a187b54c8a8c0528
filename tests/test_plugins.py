"""Methods as plug-ins: a method defined in this file, registered here and trained for one epoch through the CLI;
the same method found through the ``gendd_pipe.methods`` entry-point group of an installed distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from gendd_pipe.cli import app
from gendd_pipe.config import PositiveFloat, configclass
from gendd_pipe.distill.methods import ENTRY_POINTS, Method, base, method_names, register
from tests.test_recipes import ROOT


@configclass
class HintConfig:
    """A FitNets-style hint on the pooled feature."""

    weight: PositiveFloat = 1.0  # weight of the feature regression against the cross-entropy


class Hint(Method):
    """A linear map of the student's feature regresses the teacher's cached feature, plus cross-entropy."""

    section, Config = "hint", HintConfig

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher, cfg)
        self.regressor = nn.Linear(student.num_features, teacher.weight.shape[1])

    def loss(self, batch: dict, epoch: int) -> dict:
        features = self.student.features(batch["image"])  # (B, Ds)
        hint = F.mse_loss(self.regressor(features), batch["feature"].float())
        ce = self.ce(self.student.classify(features), batch)
        return {"loss": ce + self.options.weight * hint, "hint": hint, "ce": ce}


def _distill_args(digit_store, out, method: str = "hint") -> list[str]:
    args = ["distill", "--store", digit_store["store"], "--out", str(out), "--method", method, "--student",
            "resnet10t", "--input-size", "32", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0",
            "--val-shards", digit_store["val"][0], "-q"]
    if method == "hint":
        args += ["--set", "distill.common.hint.weight=0.5"]
    for shard in digit_store["train"]:
        args += ["--shards", shard]
    return args


@pytest.fixture
def registry(monkeypatch):
    """The registry as the built-ins leave it, restored after the test."""
    method_names()  # load the built-in methods and entry points first
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_a_method_defined_in_a_test_trains_through_the_cli(digit_store, tmp_path, registry):
    register("hint")(Hint)
    runner = CliRunner()
    result = runner.invoke(app, _distill_args(digit_store, tmp_path / "d"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "d" / "runs" / "hint"
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["epoch"] == 1 and epoch["train"]["hint"] > 0 and {k for k, v in epoch["val"].items() if isinstance(v, dict)} == {"student"}
    resolved = yaml.safe_load((run / "config.yaml").read_text())["runs"]["hint"]
    assert resolved["method"] == "hint" and resolved["hint"] == {"weight": 0.5}
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.safetensors"), "--val-shards",
                                 digit_store["val"][0], "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["run"] == "hint" and 0 <= json.loads(result.output)["student"]["top1"] <= 100
    result = runner.invoke(app, [*_distill_args(digit_store, tmp_path / "e"), "--set", "distill.common.hint.wieght=1"])
    assert result.exit_code == 1 and "distill.common.hint.wieght: unknown key (did you mean 'weight'?" in result.output


def _distribution(folder, entry_points: str) -> dict:
    """An installed distribution (its dist-info on the path) that declares ``entry_points``."""
    info = folder / "hint_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hint-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINTS}]\n{entry_points}\n")
    path = os.pathsep.join([str(folder), ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_an_entry_point_method_trains_in_a_fresh_process(digit_store, tmp_path):
    env = _distribution(tmp_path / "site", "hint = tests.test_plugins:Hint")
    cmd = [sys.executable, "-m", "gendd_pipe.cli", *_distill_args(digit_store, tmp_path / "d")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d" / "runs" / "hint" / "last.safetensors").exists()
    assert "hint" in subprocess.run([sys.executable, "-m", "gendd_pipe.cli", "distill", "--help"], env=env,
                                    capture_output=True, text=True, timeout=120).stdout


def test_a_broken_entry_point_names_itself_and_breaks_no_other_method(digit_store, tmp_path):
    env = _distribution(tmp_path / "site", "broken = no_such_package.methods:Broken")
    args = _distill_args(digit_store, tmp_path / "d", method="broken")
    done = subprocess.run([sys.executable, "-m", "gendd_pipe.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    why = "method 'broken' (entry point no_such_package.methods:Broken): cannot load (ModuleNotFoundError"
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: distill.runs.broken.method: {why}" in done.stderr
    done = subprocess.run([sys.executable, "-m", "gendd_pipe.cli", "config", "show", "--config",
                           os.path.join(ROOT, "params.yaml"), "--section", "distill"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and why in done.stderr  # a warning; the built-in methods still run
    assert yaml.safe_load(done.stdout)["distill"]["runs"]["gendd"]["method"] == "gendd"
