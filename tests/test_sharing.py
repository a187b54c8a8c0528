"""Sharing a store across teams with DVC: one team pushes it to a remote, another pulls only the store.

Real git, real DVC (a local-directory remote), a fresh clone that has neither the
teacher nor its weights, and a real distill from the pulled store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.train import distill
from gendd_pipe.verify import verify
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


def _extract_in(checkout, *extra):
    """``gendd-pipe extract`` run in a checkout, on its shards given as the recipe gives them: relative."""
    command = [sys.executable, "-m", "gendd_pipe.cli", "extract", "shards/train-*.tar", "--out", "data/store.zarr",
               "--teacher", "resnet18", "--weights", "none", "--input-size", "32", "--views", "2", "--threads", "1",
               "--dask-workers", "0", "-q", *extra]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_checkouts_build_the_same_bytes_and_a_moved_or_imported_store_serves_all(digit_store, tmp_path):
    origin, a, b = tmp_path / "origin", tmp_path / "a", tmp_path / "b"
    origin.mkdir()
    _sh(origin, "git", "init", "-q")
    _sh(origin, DVC, "init", "-q")
    _sh(origin, DVC, "config", "core.analytics", "false")
    _sh(origin, DVC, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    shutil.copytree(os.path.dirname(digit_store["train"][0]), origin / "shards")
    _sh(origin, "git", "add", "-A")
    _sh(origin, "git", "commit", "-q", "-m", "shards")
    for checkout in (a, b):
        _sh(tmp_path, "git", "clone", "-q", str(origin), str(checkout))
        _extract_in(checkout)
        _sh(checkout, DVC, "add", "-q", "data/store.zarr")
    assert _tree(a / "data" / "store.zarr") == _tree(b / "data" / "store.zarr")
    assert (a / "data" / "store.zarr.dvc").read_text() == (b / "data" / "store.zarr.dvc").read_text()
    sources = [s["source"] for s in FeatureStore.open(str(a / "data" / "store.zarr")).manifest["shards"]]
    assert sources == [f"shards/{os.path.basename(p)}" for p in sorted(digit_store["train"])]

    moved = tmp_path / "elsewhere" / "moved.zarr"  # copied out of the checkout: opens, verifies, recomputes there
    shutil.copytree(a / "data" / "store.zarr", moved)
    check = subprocess.run([sys.executable, "-m", "gendd_pipe.cli", "verify", str(moved), "--recompute", "3"],
                           cwd=b, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "3 samples recomputed" in check.stdout, check.stdout + check.stderr
    _extract_in(a)  # a resume from the same checkout finds every shard complete and changes nothing
    assert _sh(a, DVC, "status", "data/store.zarr.dvc").strip().endswith("up to date.")

    # another team's repository imports the store (git + a local DVC remote) and distills from it
    _sh(a, "git", "add", "-A")
    _sh(a, "git", "commit", "-q", "-m", "store")
    _sh(a, DVC, "push", "-q", "data/store.zarr.dvc")
    _sh(a, "git", "push", "-q", "origin", "HEAD:imported")
    other = tmp_path / "other"
    other.mkdir()
    _sh(other, "git", "init", "-q")
    _sh(other, DVC, "init", "-q")
    _sh(other, DVC, "import", "-q", str(origin), "data/store.zarr", "-o", "features.zarr", "--rev", "imported")
    store = FeatureStore.open(str(other / "features.zarr"))
    assert _tree(other / "features.zarr") == _tree(a / "data" / "store.zarr") and verify(store)["ok"]
    cfg = DistillConfig(method="kd", student=StudentConfig("resnet10t", 32), epochs=1, warmup_epochs=0,
                        loader=LoaderConfig(batch_size=16, shuffle_buffer=48))
    summary = distill(store.url, digit_store["train"], digit_store["val"], str(other / "runs"), cfg, progress=False)
    assert summary["last"]["epoch"] == 1


@pytest.mark.slow
def test_a_store_in_a_read_only_directory_serves_info_verify_distill_and_evaluate(digit_store, tmp_path):
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount read-only ({probe.stderr.decode().strip()})")
    store = tmp_path / "ro" / "store.zarr"
    shutil.copytree(digit_store["store"], store)
    cli = f"{sys.executable} -m gendd_pipe.cli"
    train, val = digit_store["train"][0], digit_store["val"][0]
    script = (f"set -e; mount --bind {tmp_path / 'ro'} {tmp_path / 'ro'}; mount -o remount,bind,ro {tmp_path / 'ro'}; "
              f"touch {store}/x 2>/dev/null && exit 3; "
              f"{cli} info {store} --json > {tmp_path}/info.json; {cli} verify {store}; "
              f"{cli} distill --store {store} --shards {train} --val-shards {val} --out {tmp_path}/runs --method kd "
              f"--student resnet10t --input-size 32 --epochs 1 --warmup-epochs 0 --batch-size 16 --num-workers 0 -q; "
              f"{cli} evaluate --distill {tmp_path}/runs --run kd --val-shards {val} -q > {tmp_path}/eval.json")
    done = subprocess.run(["unshare", "-Urm", "bash", "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", ok" in done.stdout
    assert json.loads((tmp_path / "info.json").read_text())["shards"] == len(FeatureStore.open(str(store)).shard_names)
    assert json.loads((tmp_path / "eval.json").read_text())["epoch"] == 1
    assert _tree(store) == _tree(Path(digit_store["store"]))
