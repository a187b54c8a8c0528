"""Distributed epochs: every rank the same steps, every sample of an epoch read by exactly one rank and worker,
whatever the shard sizes; real torchrun processes over shards of 37, 100 and 250 digits."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gendd_pipe import GenddError
from gendd_pipe.data.streams import epoch_order, epoch_part, epoch_steps
from gendd_pipe.data.prepare import write_shards

SIZES = (37, 100, 250)


@pytest.mark.parametrize("counts", [(37, 100, 250), (5,), (1, 1, 64, 3), (100, 100)])
def test_epoch_parts_cover_the_epoch_once_with_equal_steps_per_rank(counts):
    samples = sum(counts)
    for world, workers, batch in itertools.product((1, 2, 3), (1, 2, 4), (1, 2, 5)):
        if samples < world * batch:
            continue
        steps, per_rank = epoch_steps(samples, world * batch, world)
        assert per_rank == batch
        rows = []
        for rank in range(world):
            mine = 0
            for worker in range(workers):
                part = epoch_part(list(counts), steps, batch, world, rank, workers, worker)
                taken = sum(end - first for _, first, end in part)
                assert taken % batch == 0  # workers fill whole batches only
                mine += taken
                rows += [sum(counts[:shard]) + r for shard, first, end in part for r in range(first, end)]
            assert mine == steps * batch  # every rank runs the same steps
        assert sorted(rows) == list(range(steps * world * batch))  # once each; the tail waits for another epoch


def test_a_batch_that_does_not_divide_or_fill_is_refused():
    with pytest.raises(GenddError, match="batch_size 30 is the global batch and must divide among the 4 ranks"):
        epoch_steps(387, 30, 4)
    with pytest.raises(GenddError, match="batch_size 1 .* among the 2 ranks"):
        epoch_steps(387, 1, 2)
    with pytest.raises(GenddError, match="387 training samples do not fill one global batch of 512"):
        epoch_steps(387, 512, 2)


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory, mnist_records):
    """Shards of 37, 100 and 250 real digits and their store (one view)."""
    from gendd_pipe.data.views import ViewConfig
    from gendd_pipe.extract import ExtractConfig, extract
    from gendd_pipe.models.teacher import TeacherConfig

    root = tmp_path_factory.mktemp("uneven")
    shards, start = [], 0
    for prefix, size in zip("abc", SIZES):
        shards += write_shards(mnist_records[start:start + size], str(root / "shards"), prefix, size)
        start += size
    store = str(root / "store.zarr")
    extract(shards, store, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                                         views=ViewConfig(count=1), dask_workers=0), progress=False)
    return {"shards": shards, "store": store, "root": root}


READ_EPOCHS = textwrap.dedent("""
    import json, os, sys
    from gendd_pipe import FeatureStore
    from gendd_pipe.data.loader import LoaderConfig, train_pipeline

    store, out, shards = sys.argv[1], sys.argv[2], sys.argv[3:]
    data_config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                   "crop_pct": 0.875, "crop_mode": "center"}
    seen = []
    for epoch in range(2):
        loader = train_pipeline(shards, FeatureStore.open(store), data_config,  # one view: train on the eval view
                                LoaderConfig(batch_size=32, shuffle_buffer=50, num_workers=2, eval_view=True), seed=0,
                                epoch=epoch)
        seen.append([list(batch["key"]) for batch in loader])
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(seen, f)
""")


@pytest.mark.slow
def test_torchrun_ranks_read_every_sample_once_per_epoch(uneven_store, tmp_path):
    """Two torchrun processes with two DataLoader workers each (4 readers, 3 shards of 37, 100 and 250
    samples), global batch 32: 12 steps of 16 per rank, every key once, the epoch's last 3 left for later."""
    script = tmp_path / "read_epochs.py"
    script.write_text(READ_EPOCHS)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), uneven_store["store"],
                           str(tmp_path), *uneven_store["shards"]], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    shards = uneven_store["shards"]
    for epoch in range(2):
        batches = [ranks[r][epoch] for r in range(2)]
        assert [len(b) for b in batches] == [12, 12] and all(len(b) == 16 for r in batches for b in r)
        keys = [k for r in batches for b in r for k in b]
        assert len(set(keys)) == len(keys) == 384
        last = epoch_order(shards, 0, epoch)[-1]  # the epoch's last shard
        assert set(_keys(shards)) - set(keys) == set(_keys([last])[-3:])  # its last 3 samples wait
    assert ranks[0][0] != ranks[0][1]  # epochs are shuffled apart


def _keys(shards: list[str]) -> list[str]:
    from gendd_pipe.data.shards import ShardReader

    return [sample.key for url in shards for sample in ShardReader(url, decode=False)]
