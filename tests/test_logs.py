"""Logs off the terminal (timestamped lines, progress at an interval, --quiet), per-epoch CSV and TensorBoard, and
models by any name timm takes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from gendd_pipe.errors import GenddError
from gendd_pipe.metrics import EpochLog
from gendd_pipe.models.hub import create_model
from gendd_pipe.models.teacher import TeacherConfig, create_teacher

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) gendd_pipe[\w.]*: ")


def _extract(shard: str, out, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gendd_pipe.cli", "extract", shard, "--out", str(out), "--teacher", "resnet18",
           "--weights", "none", "--input-size", "32", "--views", "2", "--dask-workers", "0", *flags]
    env = {**os.environ, "GENDD_PIPE_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # stderr is a pipe, no tty
    assert done.returncode == 0, done.stderr
    return done


def test_off_a_terminal_logs_are_timestamped_lines_with_progress(digit_shards, tmp_path):
    done = _extract(digit_shards[0], tmp_path / "a.zarr", "--verbose")
    lines = done.stderr.splitlines()
    assert lines and all(LINE.match(line) for line in lines), done.stderr
    assert any(re.search(r"INFO gendd_pipe.progress: extract: 0/1 shards, \d+ images, [\d.]+ img/s", line)
               for line in lines)
    assert any("extract: 1/1 shards, 40 images" in line for line in lines)
    assert any(f"{tmp_path / 'a.zarr'}: 1 shards, 40 samples, 0 skipped" in line for line in lines)
    assert any(" DEBUG gendd_pipe.cli: extract: {" in line for line in lines)  # --verbose: the resolved config
    assert "\x1b[" not in done.stderr  # no colour codes, no live bars
    assert _extract(digit_shards[0], tmp_path / "q.zarr", "-q").stderr == ""  # --quiet: warnings and errors only


def test_epoch_log_writes_jsonl_csv_and_tensorboard_and_drops_epochs_past_a_resume(tmp_path):
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    log = EpochLog(str(tmp_path))
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "lr": 0.1 / epoch, "train": {"loss": 3.0 - epoch},
                    "val": {"student": {"top1": 10.0 * epoch, "top5": 50.0}, "images": 48}})
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val/student/top1"]) for r in rows] == [10.0, 20.0, 30.0]
    assert list(rows[0]) == ["epoch", "lr", "train/loss", "val/student/top1", "val/student/top5", "val/images"]
    events = tensorboard.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/student/top1")] == [(1, 10.0), (2, 20.0), (3, 30.0)]

    EpochLog(str(tmp_path), keep_through=1).close()  # a run resumed from the checkpoint of epoch 1
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")] == [1]
    assert len(open(tmp_path / "metrics.csv").read().splitlines()) == 2


def test_models_by_any_name_timm_takes(tmp_path):
    assert isinstance(create_model("resnet18.a1_in1k", "teacher", pretrained=False), torch.nn.Module)
    with pytest.raises(GenddError, match=r"teacher model 'hf-hub:timm/resnet18.a1_in1k': cannot fetch it from the "
                                         r"Hugging Face hub .*name the architecture \(resnet18\) with weights: PATH"):
        create_model("hf-hub:timm/resnet18.a1_in1k", "teacher", pretrained=True)  # HF_HUB_OFFLINE=1 in tests
    with pytest.raises(GenddError, match="a hub repository is named hf-hub:timm/resnet18"):
        create_model("timm/resnet18", "student")
    with pytest.raises(GenddError, match="unknown student model 'resnet19'"):
        create_model("resnet19", "student")
    with pytest.raises(GenddError, match="student model 'resnet18.no_such_tag'"):
        create_model("resnet18.no_such_tag", "student", pretrained=True)

    # a hub repository downloaded to disk: config.json (timm's pretrained config) + model.safetensors
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=7)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 7,
                                                  "pretrained_cfg": {"input_size": [3, 64, 64], "crop_pct": 0.9}}))
    save_file(source.state_dict(), str(repo / "model.safetensors"))
    teacher = create_teacher(TeacherConfig(f"local-dir:{repo}", "pretrained"))
    assert teacher.num_classes == 7 and teacher.input_hw == (64, 64)
    images = torch.randn(2, 3, 64, 64)
    source.eval()
    with torch.no_grad():
        assert torch.allclose(teacher(images)[1], source(images), atol=1e-4)
    with pytest.raises(GenddError, match=f"teacher model 'local-dir:{tmp_path / 'nowhere'}'"):
        create_teacher(TeacherConfig(f"local-dir:{tmp_path / 'nowhere'}", "pretrained"))
