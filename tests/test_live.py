"""A live teacher in place of a store: the same run from the cache and with the teacher live, fresh views
every epoch, the checks that refuse a live teacher its run cannot use."""

import dataclasses

import numpy as np
import pytest
import torch

from gendd_pipe.data.loader import LoaderConfig
from gendd_pipe.distill import train
from gendd_pipe.distill.checkpoint import read_checkpoint
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.live import LiveTeacher, LiveTeacherConfig, LiveViews
from gendd_pipe.distill.methods.gendd import GenddConfig
from gendd_pipe.distill.methods.logit import LogitConfig
from gendd_pipe.distill.train import distill
from gendd_pipe.errors import GenddError
from gendd_pipe.models.gendd_head import HeadConfig, SamplingConfig
from gendd_pipe.models.student import StudentConfig
from gendd_pipe.runtime import RuntimeConfig
from gendd_pipe.store.reader import FeatureStore

# the digit_store fixture's teacher and views (tests/conftest.py)
STORED = LiveTeacherConfig(name="resnet18", weights="none", input_size=32,
                           views=LiveViews(count=3, scale=(0.5, 1.0), hflip=0.0, seed=0))
GENDD = GenddConfig(head=HeadConfig(depth=1, width=64, diffusion_batch_mul=2), predict=SamplingConfig(sampling_steps=4))


def _cfg(method, **kwargs):
    options = GENDD if method == "gendd" else LogitConfig(warmup_epochs=0)
    base = dict(method=method, student=StudentConfig("resnet10t", 32), epochs=1, lr=3e-3, warmup_epochs=0,
                loader=LoaderConfig(batch_size=16, shuffle_buffer=48, num_workers=1))
    return DistillConfig(**{**base, **kwargs}, options=options)


@pytest.fixture
def step_losses(monkeypatch):
    """The loss of every training step of the runs a test makes, in order, as the loop hands it to its bar."""
    runs = []

    class Recording(train.StepBar):
        def __enter__(self):
            runs.append([])
            return super().__enter__()

        def step(self, loss):
            runs[-1].append(float(loss))
            super().step(loss)

    monkeypatch.setattr(train, "StepBar", Recording)
    return runs


def _weights(path):
    state = read_checkpoint(str(path / "last.safetensors"))["state_dict"]
    return torch.cat([v.float().flatten() for v in state.values() if v.is_floating_point()])


@pytest.mark.parametrize("method", ["kd", "gendd"])
def test_the_cached_path_is_the_live_path(digit_store, tmp_path, step_losses, method):
    """One epoch from the store, and one with the teacher live on the very views the store holds, make the same
    steps: per-step losses within 2e-3 and final weights within 2e-3 (relative). The only difference is the
    store's fp16 rounding of the features (relative 2^-11 = 4.9e-4 each), which reaches the loss through the
    logits (KD) or the diffusion target (GenDD) and the weights through the gradients; fresh views (another
    draw of crops) move both by far more."""
    args = (digit_store["train"], digit_store["val"])
    distill(digit_store["store"], *args, str(tmp_path / "cached"), _cfg(method), progress=False)
    distill(None, *args, str(tmp_path / "live"), _cfg(method, teacher=STORED), progress=False)
    fresh = dataclasses.replace(STORED, views=LiveViews(scale=(0.5, 1.0), hflip=0.0, seed=0))
    distill(None, *args, str(tmp_path / "fresh"), _cfg(method, teacher=fresh), progress=False)
    cached, live, other = (np.array(run) for run in step_losses)
    assert len(cached) == len(live) == 6  # 96 digits in batches of 16
    np.testing.assert_allclose(live, cached, rtol=2e-3)
    assert np.abs(other / cached - 1).max() > 1e-2  # not the same steps: the test can tell runs apart
    a, b, c = (_weights(tmp_path / run) for run in ("cached", "live", "fresh"))
    assert float((b - a).norm() / a.norm()) < 2e-3
    assert float((c - a).norm() / a.norm()) > 1e-2


def test_a_live_teacher_draws_the_stores_views_and_its_features(digit_store):
    """With views.count the store's, the live teacher plans each row's views as the extraction stored them, and
    its features of them equal the stored ones up to their fp16 rounding; its head is the store's."""
    store = FeatureStore.open(digit_store["store"])
    live = LiveTeacher(STORED, RuntimeConfig(device="cpu"), torch.device("cpu"))
    from gendd_pipe.data.shards import ShardReader

    samples = list(ShardReader(digit_store["train"][0], decode=False))
    block, stored = live.plan(samples), store.read_shard("train-000000")
    np.testing.assert_array_equal(block["views"], stored["views"])
    rows = [{k: a[i] for k, a in block.items()} for i in range(4)]
    pixels = torch.cat([live.replay.views(s, r) for s, r in zip(samples, rows)])
    features = live.outputs(pixels)["feature"].reshape(4, 3, -1).numpy()
    np.testing.assert_allclose(features, stored["features"][:4].astype(np.float32), rtol=2e-3, atol=2e-3)
    head = live.head(digit_store["train"][0], 16)
    weight, bias = store.head()
    assert np.array_equal(head.weight.numpy(), weight) and np.array_equal(head.bias.numpy(), bias)
    assert head.feature_norm == pytest.approx(train.teacher_head(store, "train-000000").feature_norm, rel=1e-3)


def test_fresh_views_are_view_one_plus_the_epoch(digit_store):
    """Fresh, epoch e's view of an image is its view 1 + e of an extraction of more views: no view twice."""
    from gendd_pipe.data.shards import ShardReader

    fresh = LiveTeacher(dataclasses.replace(STORED, views=LiveViews(scale=(0.5, 1.0), hflip=0.0, seed=0)),
                        RuntimeConfig(device="cpu"), torch.device("cpu"))
    many = LiveTeacher(dataclasses.replace(STORED, views=LiveViews(count=6, scale=(0.5, 1.0), hflip=0.0, seed=0)),
                       RuntimeConfig(device="cpu"), torch.device("cpu"))
    samples = list(ShardReader(digit_store["train"][0], decode=False))[:5]
    all_views = many.plan(samples)["views"]
    for epoch in range(5):
        np.testing.assert_array_equal(fresh.plan(samples, which=[0, 1 + epoch])["views"][:, 1], all_views[:, 1 + epoch])
    assert len({all_views[0, v].tobytes() for v in range(1, 6)}) == 5


def test_what_a_live_teacher_cannot_do_is_one_line(digit_store, tmp_path):
    import timm
    from safetensors.torch import save_file

    from tests.test_cli import _invoke, _one_line_error

    args = (digit_store["train"], digit_store["val"])
    with pytest.raises(GenddError, match="names both a store and a live teacher"):
        distill(digit_store["store"], *args, str(tmp_path / "both"), _cfg("kd", teacher=STORED), progress=False)
    five = str(tmp_path / "five.safetensors")  # a teacher of 5 classes; the digits have 10
    save_file(timm.create_model("resnet18", num_classes=5).state_dict(), five)
    with pytest.raises(GenddError, match=r"live teacher resnet18: its classifier has 5 classes but the train shards "
                                         r"have label 9"):
        distill(None, *args, str(tmp_path / "five"), _cfg("kd", teacher=dataclasses.replace(STORED, weights=five)),
                progress=False)
    fresh = dataclasses.replace(STORED, views=LiveViews())
    with pytest.raises(GenddError, match="loader.views 2: the live teacher resnet18 draws a fresh view every epoch"):
        distill(None, *args, str(tmp_path / "views"),
                _cfg("kd", teacher=fresh, loader=LoaderConfig(batch_size=16, views=2)), progress=False)
    mixed = dataclasses.replace(STORED, augment=dataclasses.replace(STORED.augment, mixup=0.2))
    with pytest.raises(GenddError, match="live teacher resnet18: its views are mixed.*method dkd needs one target"):
        distill(None, *args, str(tmp_path / "mixed"), _cfg("dkd", teacher=mixed), progress=False)
    out = ["--shards", digit_store["train"][0], "--val-shards", digit_store["val"][0], "--out", tmp_path / "cli"]
    _one_line_error(_invoke("distill", "--method", "kd", "--store", digit_store["store"], "--teacher", "resnet18",
                            *out), "--store", "--teacher resnet18", "not both")
    _one_line_error(_invoke("distill", "--method", "kd", *out), "distill.store", "names no live teacher")
    assert not (tmp_path / "cli").exists() and not (tmp_path / "five").exists()


def test_a_live_run_from_the_command_line(digit_store, tmp_path):
    from tests.test_cli import _invoke

    result = _invoke("distill", "--method", "kd", "--teacher", "resnet18", "--teacher-weights", "none",
                     "--teacher-input-size", 32, "--student", "resnet10t", "--input-size", 32, "--epochs", 1,
                     "--batch-size", 16, "--shards", digit_store["train"][0], "--val-shards", digit_store["val"][0],
                     "--out", tmp_path / "out", "--set", "distill.runs.kd.teacher.views.scale=[0.5,1.0]", "-q")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(str(tmp_path / "out" / "runs" / "kd" / "last.safetensors"))
    assert ckpt["store"] is None and ckpt["config"]["teacher"]["name"] == "resnet18"
    assert ckpt["config"]["teacher"]["views"]["count"] is None and ckpt["teacher"]["head_shape"] == [1000, 512]


@pytest.mark.slow
def test_a_live_run_under_torchrun(digit_store, tmp_path):
    """Two torchrun processes (gloo), each running the live teacher on its own half of every global batch; rank 0
    counts the shards and writes."""
    import os
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gendd_pipe.cli", "distill", "-r", "kd-live",
           "--method", "kd", "--teacher", "resnet18", "--teacher-weights", "none", "--teacher-input-size", "32",
           "--student", "resnet10t", "--input-size", "32", "--epochs", "1", "--batch-size", "16",
           "--shards", digit_store["train"][0], "--shards", digit_store["train"][1],
           "--val-shards", digit_store["val"][0], "--out", str(tmp_path / "ddp"), "-q"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = read_checkpoint(str(tmp_path / "ddp" / "runs" / "kd-live" / "last.safetensors"))
    assert ckpt["distributed"] == {"world_size": 2, "rank_batch": 8, "batch_size": 16} and ckpt["store"] is None
    assert ckpt["config"]["teacher"]["views"]["count"] is None and ckpt["epoch"] == 1
