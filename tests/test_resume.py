"""A real extract process killed with SIGKILL mid-run, then re-run, equals an uninterrupted run byte for byte
(but for the ``out`` path in the run's config.yaml at the store's root)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gendd_pipe.data.prepare import write_shards

ARGS = ["--teacher", "resnet18", "--weights", "none", "--input-size", "64", "--views", "3", "--dask-workers", "1",
        "--threads", "1", "--batch-size", "32", "-q"]


def _extract(shards: str, store: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gendd_pipe.cli", "extract", shards, "--out", str(store), *ARGS]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _complete(store: Path) -> int:
    return sum('"complete": true' in p.read_text() for p in store.glob("shards/*/zarr.json"))


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tmp_path, mnist_records):
    write_shards(mnist_records[:480], str(tmp_path / "shards"), "train", 80)  # six shards
    shards = str(tmp_path / "shards" / "train-{000000..000005}.tar")

    killed = tmp_path / "killed.zarr"
    proc = _extract(shards, killed)
    deadline = time.time() + 300
    while _complete(killed) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "extract finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Dask workers, mid-run
    proc.wait()
    time.sleep(1)
    assert 2 <= _complete(killed) < 6

    resumed = _extract(shards, killed)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()
    clean = _extract(shards, tmp_path / "clean.zarr")
    assert clean.wait(timeout=600) == 0, clean.stdout.read().decode()

    a, b = _files(killed), _files(tmp_path / "clean.zarr")
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == ["config.yaml"]  # the run's config names its --out
    config_a, config_b = yaml.safe_load(a["config.yaml"]), yaml.safe_load(b["config.yaml"])
    assert config_a.pop("out") == str(killed) and config_b.pop("out") == str(tmp_path / "clean.zarr")
    assert config_a == config_b
    assert _complete(killed) == 6
