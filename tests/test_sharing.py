"""Sharing a store across teams with DVC: one team pushes it to a remote, another pulls only the store.

Real git, real DVC (a local-directory remote), a fresh clone that has neither the
teacher nor its weights, and a real distill from the pulled store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.train import distill
from gendd_pipe.store.audit import verify
from gendd_pipe.models.student import StudentConfig
from gendd_pipe.data.loader import LoaderConfig
from gendd_pipe.store.reader import FeatureStore

DVC = os.path.join(os.path.dirname(sys.executable), "dvc")
GIT_ENV = {"GIT_AUTHOR_NAME": "team", "GIT_AUTHOR_EMAIL": "team@example.invalid",
           "GIT_COMMITTER_NAME": "team", "GIT_COMMITTER_EMAIL": "team@example.invalid"}


def _sh(cwd, *cmd):
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr or done.stdout}"
    return done.stdout


@pytest.mark.slow
def test_a_pushed_store_is_pulled_alone_and_distilled_from(digit_store, tmp_path):
    remote, team_a, team_b = tmp_path / "remote", tmp_path / "team-a", tmp_path / "team-b"
    team_a.mkdir()
    _sh(team_a, "git", "init", "-q")
    _sh(team_a, DVC, "init", "-q")
    _sh(team_a, DVC, "config", "core.analytics", "false")
    _sh(team_a, DVC, "remote", "add", "-d", "shared", str(remote))
    os.makedirs(team_a / "data")
    shutil.copytree(digit_store["store"], team_a / "data" / "store.zarr")
    (team_a / "data" / "teacher.safetensors").write_bytes(b"weights that stay with team a")
    _sh(team_a, DVC, "add", "data/store.zarr", "data/teacher.safetensors")
    _sh(team_a, "git", "add", "-A")
    _sh(team_a, "git", "commit", "-q", "-m", "teacher features")
    _sh(team_a, DVC, "push", "data/store.zarr.dvc")

    _sh(tmp_path, "git", "clone", "-q", str(team_a), str(team_b))
    assert not (team_b / "data" / "store.zarr").exists()
    _sh(team_b, DVC, "pull", "data/store.zarr.dvc")
    assert not (team_b / "data" / "teacher.safetensors").exists()  # only the store came
    store = FeatureStore.open(str(team_b / "data" / "store.zarr"))
    assert verify(store)["ok"] and store.num_samples == FeatureStore.open(digit_store["store"]).num_samples

    cfg = DistillConfig(method="kd", student=StudentConfig("resnet10t", 32), epochs=1, warmup_epochs=0,
                        loader=LoaderConfig(batch_size=16, shuffle_buffer=48))
    summary = distill(store.url, digit_store["train"], digit_store["val"], str(team_b / "runs" / "kd"), cfg,
                      progress=False)
    assert summary["last"]["epoch"] == 1 and 0 <= summary["last"]["student"]["top1"] <= 100
