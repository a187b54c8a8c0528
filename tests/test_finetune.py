"""Fine-tuning a teacher on real digit shards: outputs, extract from them, kept-as-shipped, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from gendd_pipe.data.views import ViewConfig
from gendd_pipe.distill.checkpoint import save_checkpoint
from gendd_pipe.errors import GenddError
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.data.shards import shard_labels
from gendd_pipe.finetune import FinetuneConfig, finetune
from gendd_pipe.models.teacher import TeacherConfig
from gendd_pipe.store.reader import FeatureStore

SMALL = TeacherConfig("resnet10t", "none", input_size=32)


def _cfg(**kwargs):
    return FinetuneConfig(**{"teacher": SMALL, "views": ViewConfig(scale=(0.5, 1.0), hflip=0.0), "epochs": 2,
                             "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, **kwargs})


def test_shard_labels_counts_without_decoding(digit_store):
    counts, _, top = shard_labels(digit_store["train"])
    assert list(counts) == digit_store["train"] and sum(counts.values()) == 96 and top == 9


def test_a_fine_tuned_teacher_learns_and_feeds_extract(digit_store, tmp_path):
    metrics = finetune(digit_store["train"], digit_store["val"], str(tmp_path / "teacher"), _cfg(epochs=3),
                       progress=False)
    assert metrics["num_classes"] == 10 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["val"]["top1"] > 20  # 10 classes, 96 digits: well above chance after 3 epochs
    files = set(os.listdir(tmp_path / "teacher"))
    assert {"metrics.json", "model.safetensors", "metrics.jsonl", "metrics.csv"} <= files and "last.safetensors" not in files
    assert load_file(metrics["model"])["fc.weight"].shape == (10, 512)

    cfg = ExtractConfig(teacher=TeacherConfig("resnet10t", metrics["model"], input_size=32),
                        views=ViewConfig(count=2, scale=(0.5, 1.0), hflip=0.0), dask_workers=0)
    extract(digit_store["val"], str(tmp_path / "store.zarr"), cfg, progress=False)
    store = FeatureStore.open(str(tmp_path / "store.zarr"))
    assert store.manifest["teacher"]["num_classes"] == 10 and store.head()[0].shape == (10, 512)


def test_epochs_zero_keeps_the_teacher_as_it_ships(digit_store, tmp_path):
    metrics = finetune(digit_store["train"], digit_store["val"], str(tmp_path), _cfg(epochs=0), progress=False)
    assert metrics["num_classes"] == 1000 and metrics["epochs"] == 0
    assert 0 <= metrics["val"]["top1"] <= 100  # digit labels 0-9 fit a 1000-way classifier, so it is scored
    assert load_file(metrics["model"])["fc.weight"].shape == (1000, 512)


def test_unlabeled_shards_and_a_foreign_run_are_refused(digit_store, cc3m_shard, tmp_path):
    with pytest.raises(GenddError, match="carry no labels"):
        finetune([cc3m_shard], digit_store["val"], str(tmp_path / "a"), _cfg(), progress=False)
    save_checkpoint(str(tmp_path / "b" / "last.safetensors"), {"epoch": 1})  # a student's checkpoint, not a teacher's
    with pytest.raises(GenddError, match="not a gendd-pipe/teacher-1 checkpoint"):
        finetune(digit_store["train"], digit_store["val"], str(tmp_path / "b"), _cfg(), resume=True, progress=False)


def _cli(digit_store, out, *extra):
    args = [sys.executable, "-m", "gendd_pipe.cli", "teacher", "--out", str(out), "--teacher", "resnet10t",
            "--weights", "none", "--input-size", "32", "--batch-size", "16", "--epochs", "3", "--view-scale", "0.5,1",
            "--hflip", "0", "-q", "--val-shards", digit_store["val"][0]]
    for shard in digit_store["train"]:
        args += ["--shards", shard]
    return args + list(extra)


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_to_the_same_weights(digit_store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_cli(digit_store, tmp_path / "whole"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert "val top-1" in whole.stdout
    proc = subprocess.Popen(_cli(digit_store, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    refused = subprocess.run(_cli(digit_store, tmp_path / "killed"), env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    again = subprocess.run(_cli(digit_store, tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    ours, theirs = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all((ours[k] == theirs[k]).all() for k in theirs)
    history = json.load(open(tmp_path / "killed" / "metrics.json"))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
