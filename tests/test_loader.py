"""The student's loader: the right cached feature beside the right image, and views replayed exactly."""

import io
import os

import numpy as np
import psutil
import pytest
import torch

from gendd_pipe import FeatureStore, GenddError, seeds
from gendd_pipe.data.loader import LoaderConfig, check_shards, train_pipeline
from gendd_pipe.data.streams import WORKER_NICENESS, workers
from gendd_pipe.data.shards import ShardReader
from gendd_pipe.data.render import render_view
from tests.helpers import to_tensor
from gendd_pipe.distill.train import _on_device
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.runtime import RuntimeConfig
from tests.conftest import write_tar

STUDENT_DC = {"input_size": (3, 24, 24), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
              "crop_pct": 0.875, "crop_mode": "center"}


def _epoch(digit_store, epoch, buffer=64):
    store = FeatureStore.open(digit_store["store"])
    loader = train_pipeline(digit_store["train"], store, STUDENT_DC, LoaderConfig(16, buffer), seed=3, epoch=epoch)
    return store, list(loader)


def test_join_gives_each_image_its_own_feature_under_shuffling(digit_store):
    store, batches = _epoch(digit_store, epoch=0)
    blocks = {n: store.read_shard(n) for n in ("train-000000", "train-000001")}
    logits = {n: store.logits(b) for n, b in blocks.items()}  # derived from the stored head
    rows = {str(k): (name, i) for name, b in blocks.items() for i, k in enumerate(b["keys"])}
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(rows) and len(keys) == 96  # every sample once
    assert keys != [str(k) for b in blocks.values() for k in b["keys"]]  # shuffled
    weight, bias = store.head()
    head = torch.from_numpy(weight), torch.from_numpy(bias)
    for batch in batches:
        assert "logits" not in batch  # a derived store's: made in batch where the student trains
        derived = _on_device(batch, STUDENT_DC, RuntimeConfig(), torch.device("cpu"), head)
        for j, key in enumerate(batch["key"]):
            name, i = rows[key]
            v = int(batch["view"][j])
            assert v == 1 + seeds.index(2, 3, 0, key)  # a training view: 1 or 2, never the eval view 0
            assert torch.equal(batch["feature"][j], torch.from_numpy(blocks[name]["features"][i, v].astype(np.float32)))
            torch.testing.assert_close(derived["logits"][j], torch.from_numpy(logits[name][i, v]), rtol=1e-5,
                                       atol=1e-5)
            assert int(batch["label"][j]) == int(blocks[name]["labels"][i])


def test_epochs_replay_and_differ(digit_store):
    _, first = _epoch(digit_store, epoch=1)
    _, again = _epoch(digit_store, epoch=1)
    _, other = _epoch(digit_store, epoch=2)
    keys = lambda bs: [k for b in bs for k in b["key"]]  # noqa: E731
    assert keys(first) == keys(again) and torch.equal(first[0]["image"], again[0]["image"])
    assert keys(first) != keys(other)
    views = torch.cat([b["view"] for b in first])
    assert set(views.tolist()) == {1, 2}  # every training view gets used; view 0, the eval view, does not


def test_view_replay_reproduces_the_teacher_input(digit_store):
    """Re-rendering a stored view at the teacher's size and running the teacher gives the stored feature."""
    store = FeatureStore.open(digit_store["store"])
    teacher = create_teacher(TeacherConfig("resnet18", "none", input_size=32))
    block = store.read_shard("train-000000")
    dc = teacher.data_config
    samples = [s for s, _ in zip(ShardReader(digit_store["train"][0]), range(6))]
    for row, sample in enumerate(samples):
        assert sample.key == block["keys"][row]
        for v in (1, 2):  # random crops
            image = render_view(sample.image, block["views"][row, v], dc["input_size"][1:], dc["interpolation"])
            feature, _ = teacher(to_tensor(image, dc["mean"], dc["std"])[None])
            cached = block["features"][row, v].astype(np.float32)
            cosine = float(feature[0] @ torch.from_numpy(cached) / (feature[0].norm() * np.linalg.norm(cached)))
            assert cosine > 0.999


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_shard_with_other_keys_or_counts_is_refused(digit_store, tmp_path):
    store = FeatureStore.open(digit_store["store"])
    samples = [{"__key__": s.key if i != 40 else "stranger", "png": _png(s.image), "cls": s.label}
               for i, s in enumerate(ShardReader(digit_store["train"][0]))]
    (tmp_path / "renamed").mkdir()
    (tmp_path / "short").mkdir()
    renamed = write_tar(tmp_path / "renamed" / "train-000000.tar", samples)
    short = write_tar(tmp_path / "short" / "train-000000.tar", samples[:30])
    with pytest.raises(GenddError, match=r"train-000000.tar: sample 'stranger' does not match the store"):
        _ = list(train_pipeline([renamed], store, STUDENT_DC, LoaderConfig(8, 8), seed=0, epoch=0))
    with pytest.raises(GenddError, match="shard ended after 30 samples but the store has 48"):
        _ = list(train_pipeline([short], store, STUDENT_DC, LoaderConfig(8, 8), seed=0, epoch=0))


def test_a_shard_missing_from_the_store_is_refused(digit_store, tmp_path):
    store = FeatureStore.open(digit_store["store"])
    other = write_tar(tmp_path / "train-000009.tar", [])
    with pytest.raises(GenddError, match=r"train-000009.tar: store .* has no complete feature shard 'train-000009'"):
        check_shards(store, [other])


def test_dataloader_workers_split_the_shards(digit_store):
    store = FeatureStore.open(digit_store["store"])
    loader = train_pipeline(digit_store["train"], store, STUDENT_DC, LoaderConfig(16, 16, num_workers=2), seed=0, epoch=0)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 96  # one shard per worker, every sample once


def test_one_loader_serves_every_epoch_with_persistent_workers(digit_store):
    store = FeatureStore.open(digit_store["store"])
    cfg = LoaderConfig(16, 16, num_workers=2)
    loader = train_pipeline(digit_store["train"], store, STUDENT_DC, cfg, seed=0)
    assert loader.persistent_workers and loader.batch_size == 16
    seen = []
    for epoch in (0, 1, 0):  # the workers started once follow set_epoch
        loader.dataset.set_epoch(epoch)
        keys = [list(batch["key"]) for batch in loader]
        fresh = [list(batch["key"]) for batch in train_pipeline(digit_store["train"], store, STUDENT_DC, cfg, seed=0,
                                                                  epoch=epoch)]
        assert keys == fresh and len(sum(keys, [])) == 96
        seen.append(keys)
    assert seen[0] == seen[2] != seen[1]


def test_loader_workers_default_to_the_cores_a_rank_may_use(monkeypatch):
    assert workers(3) == 3 and workers(0) == 0
    assert 1 <= workers(None) <= 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "512")  # more ranks than cores on the node: one worker each
    assert workers(None) == 1


class _WorkerState(torch.utils.data.IterableDataset):
    """What a loader worker runs with: its niceness, its largest native thread pool, Blosc's threads."""

    def __iter__(self):
        from numcodecs import blosc
        from threadpoolctl import threadpool_info

        yield {"nice": os.getpriority(os.PRIO_PROCESS, 0), "blosc": blosc.get_nthreads(),
               "pool": max((pool["num_threads"] for pool in threadpool_info()), default=1)}


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu loop", "gpu loop"])
def test_loader_workers_run_one_thread_per_pool_below_a_cpu_loop_only(cuda):
    from gendd_pipe.data.streams import data_loader

    ours = os.getpriority(os.PRIO_PROCESS, 0)
    state = next(iter(data_loader(_WorkerState(), 1, 1, cuda)))
    assert int(state["pool"]) == 1 and int(state["blosc"]) == 1
    assert int(state["nice"]) == ours + (0 if cuda else WORKER_NICENESS)


def test_loader_workers_run_below_the_loop_they_feed(digit_store):
    store = FeatureStore.open(digit_store["store"])
    loader = train_pipeline(digit_store["train"], store, STUDENT_DC, LoaderConfig(16, 16, num_workers=2), seed=0)
    batches = iter(loader)
    next(batches)  # the workers have started
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    started = {p.pid: p.nice() for p in psutil.Process().children()}
    del batches
    assert sorted(started.values())[-2:] == [ours + WORKER_NICENESS] * 2, started


def test_val_shards_split_by_whole_shards_among_ranks_when_there_are_enough(digit_shards, monkeypatch):
    """Three shards on two ranks: each shard read by one rank only; on four ranks, every fourth sample of each."""
    from gendd_pipe.data.streams import eval_pipeline

    labels = [[s.label for s in ShardReader(url)] for url in digit_shards]

    def rank_labels(rank: int, world: int) -> list[int]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        return [int(x) for batch in eval_pipeline(digit_shards, STUDENT_DC, 16, num_workers=0) for x in batch["label"]]

    assert rank_labels(0, 2) == labels[0] + labels[2] and rank_labels(1, 2) == labels[1]
    for rank in range(4):
        assert rank_labels(rank, 4) == [x for shard in labels for x in shard[rank::4]]
