"""Stores that grow by views: ``extract --views N`` on a store of fewer views adds the views its rows lack,
drawn as an N-view extraction draws them, so a grown store reads array for array as one extracted at N, its
first views keep their bytes, readers see N only once every shard has them, a SIGKILL midway resumes, two
growing extractions share the work, and a request of other settings is one line that changes nothing."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gendd_pipe import FeatureStore
from gendd_pipe.data.augment import AugmentConfig
from gendd_pipe.data.prepare import write_shards
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.models.teacher import TeacherConfig
from gendd_pipe.verify import verify
from tests.test_cli import _invoke, _one_line_error
from tests.test_faults import Watcher, _files, _wait_for

PLAIN = ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                      views=ViewConfig(count=2, scale=(0.5, 1.0), seed=0), dask_workers=0, batch_size=16)
AUGMENTED = replace(PLAIN, logits="full", augment=AugmentConfig(randaugment="rand-n2-m7-mstd0.5", mixup=0.2,
                                                                 cutmix=1.0, color_jitter=0.4))


def _views(cfg: ExtractConfig, count: int) -> ExtractConfig:
    return replace(cfg, views=replace(cfg.views, count=count))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mnist_records):
    root = tmp_path_factory.mktemp("grow")
    return write_shards(mnist_records[:72], str(root / "shards"), "train", 24)


def _same_arrays(a: str, b: str) -> None:
    """Two stores that read alike: the same manifest but its tool version, and every array of every shard."""
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    assert {k: v for k, v in x.manifest.items() if k != "tool_version"} == \
        {k: v for k, v in y.manifest.items() if k != "tool_version"}
    assert x.shard_names == y.shard_names
    for name in y.shard_names:
        left, right = x.read_shard(name), y.read_shard(name)
        assert left.keys() == right.keys()
        for key in right:
            np.testing.assert_array_equal(left[key], right[key], err_msg=f"{name}/{key}")


@pytest.mark.parametrize("cfg", [PLAIN, AUGMENTED], ids=["plain", "randaugment-jitter-mix"])
def test_a_grown_store_reads_as_one_extracted_at_that_count(tmp_path, shards, cfg):
    grown, fresh = str(tmp_path / "grown.zarr"), str(tmp_path / "fresh.zarr")
    extract(shards, grown, cfg, progress=False)
    before = _files(Path(grown))
    extract(shards, grown, _views(cfg, 5), progress=False)
    extract(shards, fresh, _views(cfg, 5), progress=False)
    _same_arrays(grown, fresh)
    after = _files(Path(grown))  # the first views' chunks keep their bytes: only metadata was rewritten
    changed = [name for name in before if after[name] != before[name]]
    assert changed and all(name.endswith("zarr.json") for name in changed), changed
    assert verify(FeatureStore.open(grown))["ok"]
    extract(shards, grown, _views(cfg, 7), progress=False)  # and again, past a chunk's width of views
    extract(shards, fresh, _views(cfg, 7), progress=False)
    _same_arrays(grown, fresh)


def test_readers_see_the_new_views_once_every_shard_has_them(tmp_path, shards):
    store = str(tmp_path / "store.zarr")
    extract(shards, store, PLAIN, progress=False)
    old = FeatureStore.open(store).read_shard("train-000000")
    extract(shards[:1], store, _views(PLAIN, 4), progress=False)  # one shard of three grown
    partly = FeatureStore.open(store)
    assert partly.num_views == 2 and len(partly.shard_names) == 3
    for key, data in partly.read_shard("train-000000").items():
        np.testing.assert_array_equal(data, old[key])  # the grown shard read at the store's 2 views
    assert verify(FeatureStore.open(store))["ok"]
    extract(shards, store, _views(PLAIN, 4), progress=False)
    whole = FeatureStore.open(store)
    assert whole.num_views == 4 and whole.read_shard("train-000002")["features"].shape[1] == 4


def test_growing_a_store_with_other_settings_is_one_line_and_changes_nothing(tmp_path, shards):
    store = tmp_path / "store.zarr"
    extract(shards[:1], str(store), _views(PLAIN, 3), progress=False)
    before = _files(store)
    base = ["extract", shards[0], "--out", store, "--weights", "none", "--input-size", 32, "--view-scale",
            "0.5,1.0", "--dask-workers", 0, "-q"]

    def refused(*args, fragments):
        _one_line_error(_invoke(*base, *args), *fragments)
        assert _files(store) == before

    refused("--teacher", "resnet10t", "--views", 5, fragments=["written with another teacher", "name"])
    refused("--teacher", "resnet18", "--views", 5, "--set", "extract.views.seed=1", fragments=["another views", "seed"])
    refused("--teacher", "resnet18", "--views", 5, "--hflip", 0.0, fragments=["another views", "hflip"])
    refused("--teacher", "resnet18", "--views", 2, fragments=["--views 2 is below its 3 views", "distill --views 2"])
    int8 = tmp_path / "int8.zarr"
    extract(shards[:1], str(int8), replace(_views(PLAIN, 2), features_dtype="int8"), progress=False)
    kept = _files(int8)
    _one_line_error(_invoke("extract", shards[0], "--out", int8, "--teacher", "resnet18", "--weights", "none",
                            "--input-size", 32, "--view-scale", "0.5,1.0", "--features-dtype", "int8", "--views", 3,
                            "--dask-workers", 0, "-q"), "--views 3", "int8", "new --out")
    assert _files(int8) == kept


SHARDS = 8
ARGS = ["--teacher", "resnet18", "--weights", "none", "--input-size", "64", "--threads", "1", "--batch-size", "24",
        "--logits", "full", "--dask-workers", "0"]


@pytest.fixture(scope="module")
def many(tmp_path_factory, mnist_records):
    """Eight shards of 24 digits, a 2-view store of them (copied by each test) and a 6-view one."""
    root = tmp_path_factory.mktemp("grow-many")
    write_shards(mnist_records[: 24 * SHARDS], str(root / "shards"), "train", 24)
    pattern = str(root / "shards" / f"train-{{000000..{SHARDS - 1:06d}}}.tar")
    cfg = ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=64), batch_size=24, logits="full",
                        dask_workers=0, threads=1)  # what ARGS ask for
    for views, name in ((2, "two.zarr"), (6, "six.zarr")):
        extract([pattern], str(root / name), _views(cfg, views), progress=False)
    return {"pattern": pattern, "two": root / "two.zarr", "six": root / "six.zarr"}


def _command(pattern: str, store: Path, views: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gendd_pipe.cli", "extract", pattern, "--out", str(store), "--views", str(views),
            *ARGS, *extra]


def _grown(store: Path) -> int:
    return sum('"views": 6' in p.read_text() for p in store.glob("shards/*/zarr.json"))


@pytest.mark.slow
def test_growth_killed_at_random_moments_resumes_to_the_fresh_store(tmp_path, many):
    import shutil

    store, rng = tmp_path / "store.zarr", random.Random(5)
    shutil.copytree(many["two"], store)
    watcher = Watcher(store)  # reads every shard, checksums included, all along
    watcher.start()
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(_command(many["pattern"], store, 6, "-q"), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = min(_grown(store) + 1, SHARDS)
        _wait_for(lambda: _grown(store) >= target, proc, timeout=300)
        threading.Event().wait(rng.uniform(0, 0.5))  # somewhere inside the next shard
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3 and 0 < _grown(store) < SHARDS
    assert FeatureStore.open(str(store)).num_views == 2  # not every shard has 6 views yet
    resumed = subprocess.run(_command(many["pattern"], store, 6, "-q"), capture_output=True, text=True, timeout=600)
    watcher.stop.set()
    watcher.join()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert watcher.problems == [] and watcher.reads > 0
    _same_arrays(str(store), str(many["six"]))


@pytest.mark.slow
def test_two_growing_extractions_grow_each_shard_once(tmp_path, many):
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(many["two"], store)
    procs = [subprocess.Popen(_command(many["pattern"], store, 6, "-v"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in (0, 1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [out[-2000:] for out in outputs]
    grown = [re.findall(r"feature shard (train-\d+): grown from 2 to 6 views", out) for out in outputs]
    assert sorted(grown[0] + grown[1]) == [f"train-{i:06d}" for i in range(SHARDS)], grown
    _same_arrays(str(store), str(many["six"]))
    assert not list((store / "leases").iterdir())
