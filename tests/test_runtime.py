"""Runtime options (device, AMP, channels_last, compile): the same code path on the CPU as on a GPU.

bf16 autocast runs on the CPU, so every test here but the ``cuda`` ones runs in CI.
The ``cuda`` tests run where torch sees a GPU and are skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gendd_pipe import FeatureStore
from gendd_pipe.config import ConfigError, parse
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.errors import GenddError
from gendd_pipe.cluster import worker_devices
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.finetune import FinetuneConfig, finetune
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.runtime import RuntimeConfig, rank_device, resolve_device
from gendd_pipe.verify import verify
from gendd_pipe.store.format import MANIFEST_ATTR
from gendd_pipe.store.writer import open_root

TEACHER = TeacherConfig("resnet18", "none", input_size=32)
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
cuda = pytest.mark.cuda


def _extract(shards, out, dask_workers=0, **runtime) -> dict:
    cfg = ExtractConfig(teacher=TEACHER, views=ViewConfig(count=2, scale=(0.5, 1.0), hflip=0.5),
                        dask_workers=dask_workers, runtime=RuntimeConfig(**runtime))
    return extract(shards, str(out), cfg, progress=False)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _features(store) -> np.ndarray:
    store = FeatureStore.open(str(store))
    return np.concatenate([store.read_shard(n)["features"] for n in store.shard_names])


@pytest.mark.parametrize("field,value,message", [
    ("device", "gpu", "must be auto, cpu, cuda or cuda:N"),
    ("device", "cuda:x", "must be auto, cpu, cuda or cuda:N"),
    ("amp", "fp8", "must be one of 'off', 'bf16' or 'fp16'"),
])
def test_runtime_values_are_checked_where_they_are_read(field, value, message):
    with pytest.raises(ConfigError, match=message):
        parse(ExtractConfig, {"runtime": {field: value}}, "extract")


@no_gpu
@pytest.mark.parametrize("runtime,message", [
    ({"device": "cuda"}, "--device cuda: torch sees no CUDA device"),
    ({"device": "cuda:7"}, "--device cuda:7: torch sees no CUDA device"),
    ({"amp": "fp16"}, "--amp fp16: float16 autocast needs a CUDA device; use --amp bf16"),
])
def test_a_device_or_precision_this_machine_lacks_is_one_line(runtime, message):
    with pytest.raises(GenddError, match=message):
        resolve_device(RuntimeConfig(**runtime))


def test_auto_is_the_gpu_when_there_is_one():
    assert resolve_device(RuntimeConfig()).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gpus(monkeypatch):
    """A node of N GPUs as torch sees it, and this process as local rank R of W (torchrun's variables)."""

    def node(count: int, local_rank: int | None = None, local_world: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        for name, value in (("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))

    return node


@pytest.mark.parametrize("count,local,ranks,device,expected", [
    (1, None, 1, "auto", "cuda:0"),  # no torchrun
    (4, 3, 4, "auto", "cuda:3"),  # a rank takes the GPU of its LOCAL_RANK
    (4, 2, 4, "cuda", "cuda:2"),
    (1, 1, 2, "cpu", "cpu"),  # CPU ranks: any number, whatever GPUs the node has
    (0, 3, 4, "auto", "cpu"),
    (2, 0, 1, "cuda:1", "cuda:1"),  # one rank on the node may name its GPU
])
def test_a_rank_takes_the_device_its_node_and_settings_give(gpus, count, local, ranks, device, expected):
    gpus(count, local, ranks)
    assert rank_device(RuntimeConfig(device=device)) == torch.device(expected)


@pytest.mark.parametrize("count,local,ranks,device,message", [
    (1, 1, 2, "auto", r"LOCAL_RANK 1: this node has 1 CUDA device\(s\) for its 2 ranks; start at most 1 per node"),
    (2, 2, 3, "cuda", r"LOCAL_RANK 2: this node has 2 CUDA device\(s\) for its 3 ranks"),
    (2, 1, 2, "cuda:0", "--device cuda:0: names one GPU for the 2 ranks of this node; pass --device cuda"),
])
def test_more_ranks_than_gpus_is_one_line_naming_both(gpus, count, local, ranks, device, message):
    gpus(count, local, ranks)
    with pytest.raises(GenddError, match=message):
        rank_device(RuntimeConfig(device=device))


def test_a_task_pins_its_gpu_before_any_cuda_work_and_says_when_it_sees_several(gpus, monkeypatch, caplog):
    from gendd_pipe.cluster import task_runtime

    pinned = []
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    gpus(2)
    assert task_runtime(RuntimeConfig(device="cuda:1"), ()).device == "cuda:1" and caplog.records == []
    task_runtime(RuntimeConfig(device="auto"), ())
    assert pinned == [torch.device("cuda:1"), torch.device("cuda:0")]
    assert "this process sees 2 GPUs and runs on cuda:0; start one worker per GPU" in caplog.text
    gpus(0)
    assert task_runtime(RuntimeConfig(), ()).device == "auto" and len(pinned) == 2  # the CPU: nothing pinned


def test_gpu_status_comes_from_nvml_by_visible_index_and_not_at_all_when_progress_is_off(monkeypatch):
    from gendd_pipe import progress

    class Nvml:  # the two NVML look-ups, by index and by UUID
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: ("index", i))
        nvmlDeviceGetHandleByUUID = staticmethod(lambda u: ("uuid", u))

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-5e1f")
    assert progress._nvml_handle(Nvml, 0) == ("index", 3) and progress._nvml_handle(Nvml, 1) == ("uuid", "GPU-5e1f")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert progress._nvml_handle(Nvml, 2) == ("index", 2)
    asked = []
    monkeypatch.setattr(progress, "gpu_status", lambda gpus: asked.append(gpus) or "cuda:0 1% 1.0/80.0 GiB")
    with progress.ExtractProgress(2, 0, enabled=False, gpus=(0,)) as bar:
        bar.add_images(8)
        bar.shard_done()
    assert asked == []


def test_one_local_dask_worker_per_visible_gpu():
    assert worker_devices(RuntimeConfig(), 0) == () and worker_devices(RuntimeConfig(device="cpu"), 4) == ()
    assert worker_devices(RuntimeConfig(), 3) == worker_devices(RuntimeConfig(device="cuda"), 3) == (
        "cuda:0", "cuda:1", "cuda:2")
    assert worker_devices(RuntimeConfig(device="cuda:2"), 4) == ("cuda:2",)


def test_bf16_extraction_matches_fp32_and_is_recorded(digit_store, tmp_path):
    full = _extract(digit_store["val"], tmp_path / "fp32.zarr")
    half = _extract(digit_store["val"], tmp_path / "bf16.zarr", amp="bf16", channels_last=False)
    assert full["compute"] == {"precision": "fp32"} and half["compute"] == {"precision": "bf16"}
    cosines = _cosines(_features(tmp_path / "fp32.zarr"), _features(tmp_path / "bf16.zarr"))
    assert cosines.min() >= 0.999, cosines.min()
    report = verify(FeatureStore.open(str(tmp_path / "bf16.zarr")), recompute_count=4)  # at the store's precision
    assert report["ok"] and report["cosine_min"] >= 0.999, report


def test_resuming_at_another_precision_is_refused_and_keeps_the_store(digit_store, tmp_path):
    store = tmp_path / "s.zarr"
    _extract(digit_store["val"], store)
    before = FeatureStore.open(str(store)).read_shard("val-000000")["features"]
    with pytest.raises(GenddError, match=r"written with another compute \(precision differ.*'fp32'.*'bf16'"):
        _extract(digit_store["val"] + digit_store["train"], store, amp="bf16")
    after = FeatureStore.open(str(store))
    assert after.shard_names == ["val-000000"] and np.array_equal(after.read_shard("val-000000")["features"], before)


def test_a_store_written_before_precision_was_recorded_resumes_at_fp32(digit_store, tmp_path):
    store = tmp_path / "s.zarr"
    _extract(digit_store["val"], store)
    root = open_root(str(store))
    root.attrs[MANIFEST_ATTR] = {k: v for k, v in root.attrs[MANIFEST_ATTR].items() if k != "compute"}
    manifest = _extract(digit_store["val"] + digit_store["train"], store)
    assert [s["name"] for s in manifest["shards"]] == ["val-000000", "train-000000", "train-000001"]
    with pytest.raises(GenddError, match="another compute"):
        _extract(digit_store["val"], store, amp="bf16")


def _unfinished_finetune(digit_store, out, monkeypatch, epochs: int, amp: str, resume: bool = False) -> dict:
    """A fine-tune that keeps its last checkpoint, as one killed after its last epoch would."""
    monkeypatch.setattr("gendd_pipe.finetune.os.remove", lambda path: None)
    cfg = FinetuneConfig(teacher=TeacherConfig("resnet10t", "none", input_size=32), views=ViewConfig(hflip=0.0),
                         epochs=epochs, batch_size=32, warmup_steps=1, runtime=RuntimeConfig(amp=amp))
    finetune(digit_store["train"], digit_store["val"], str(out), cfg, resume=resume, progress=False)
    from gendd_pipe.distill.checkpoint import read_checkpoint
    from gendd_pipe.finetune import FORMAT

    return read_checkpoint(str(out / "last.safetensors"), FORMAT)


def test_a_fine_tune_keeps_its_scaler_and_resumes_at_its_own_precision_only(digit_store, tmp_path, monkeypatch):
    ckpt = _unfinished_finetune(digit_store, tmp_path, monkeypatch, 1, "bf16")
    assert ckpt["scaler"] == {}  # bf16 needs no loss scale: the disabled scaler's state
    with pytest.raises(GenddError, match=r"was trained with other settings \(runtime.amp \(bf16, not off\)\)"):
        _unfinished_finetune(digit_store, tmp_path, monkeypatch, 2, "off", resume=True)
    assert _unfinished_finetune(digit_store, tmp_path, monkeypatch, 2, "bf16", resume=True)["epoch"] == 2


@cuda
def test_an_fp16_fine_tune_resumes_with_its_loss_scale(digit_store, tmp_path, monkeypatch):
    first = _unfinished_finetune(digit_store, tmp_path, monkeypatch, 1, "fp16")["scaler"]
    assert first["scale"] > 0 and first["growth_interval"] == 2000
    then = _unfinished_finetune(digit_store, tmp_path, monkeypatch, 2, "fp16", resume=True)["scaler"]
    steps = 96 // 32
    assert then["scale"] < first["scale"] or then["_growth_tracker"] == first["_growth_tracker"] + steps


def test_fine_tune_trains_under_bf16_autocast(digit_store, tmp_path):
    cfg = FinetuneConfig(teacher=TeacherConfig("resnet10t", "none", input_size=32), views=ViewConfig(hflip=0.0),
                         epochs=1, batch_size=32, warmup_steps=1, runtime=RuntimeConfig(amp="bf16"))
    metrics = finetune(digit_store["train"], digit_store["val"], str(tmp_path), cfg, progress=False)
    weights = load_file(metrics["model"])
    assert weights["fc.weight"].dtype == torch.float32 and torch.isfinite(weights["fc.weight"]).all()
    assert np.isfinite(metrics["history"][0]["loss"])


@cuda
def test_gpu_amp_extraction_matches_cpu_fp32(digit_store, tmp_path):
    _extract(digit_store["val"], tmp_path / "cpu.zarr", device="cpu")
    for amp in ("bf16", "fp16"):
        manifest = _extract(digit_store["val"], tmp_path / f"{amp}.zarr", device="cuda", amp=amp)
        assert manifest["compute"] == {"precision": amp}
        cosines = _cosines(_features(tmp_path / "cpu.zarr"), _features(tmp_path / f"{amp}.zarr"))
        assert cosines.min() >= 0.999, (amp, cosines.min())


@cuda
def test_a_teacher_on_the_gpu_keeps_the_head_and_returns_cpu_outputs():
    teacher = create_teacher(TEACHER, RuntimeConfig(device="cuda", amp="bf16"))
    features, logits = teacher(torch.randn(4, 3, 32, 32))
    assert features.device.type == logits.device.type == "cpu" and features.dtype == torch.float32
    weight, bias = teacher.head()
    torch.testing.assert_close(logits, features @ torch.from_numpy(weight).T + torch.from_numpy(bias),
                               atol=0.1, rtol=0.02)  # bf16 classifier


@cuda
@pytest.mark.slow
def test_dask_gpu_workers_write_what_the_gpu_writes_in_process(digit_store, tmp_path):
    _extract(digit_store["val"], tmp_path / "here.zarr", device="cuda", amp="bf16")
    _extract(digit_store["val"], tmp_path / "dask.zarr", dask_workers=1, device="cuda", amp="bf16")
    assert _cosines(_features(tmp_path / "here.zarr"), _features(tmp_path / "dask.zarr")).min() >= 0.9999


@no_gpu
@pytest.mark.parametrize("options,message", [
    (["--device", "cuda"], "error: --device cuda: torch sees no CUDA device"),
    (["--amp", "fp16"], "error: --amp fp16: float16 autocast needs a CUDA device"),
    (["--device", "gpu"], "error: extract.runtime.device: must be auto, cpu, cuda or cuda:N, got 'gpu' (option --device)"),
    (["--logits", "derived", "--teacher", "dla34"], "error: --logits derived: the classifier of dla34 is a Conv2d"),
])
def test_the_cli_refuses_in_one_line_before_any_work(digit_store, tmp_path, options, message):
    from tests.test_bad_inputs import invoke, one_line

    args = ["extract", *digit_store["val"], "--out", tmp_path / "s.zarr", "--teacher", "resnet18", "--weights", "none",
            "--input-size", "32", "--dask-workers", "0", "-q", *options]
    one_line(invoke(*args), message)
    assert not (tmp_path / "s.zarr" / "shards").exists()


@pytest.mark.parametrize("method,extra,graphs", [
    ("kd", {}, [1, 1, 1, 1]),
    ("gendd", {"gendd": {"stage1_epochs": 1, "head": {"width": 64, "depth": 1, "diffusion_batch_mul": 2}}},
     [1, 2, 2, 2]),  # stage 1's graph, then stage 2's: one per phase
    ("dkd", {"logit": {"warmup_epochs": 3}}, [1, 2, 2, 2]),  # the epoch int turns symbolic at its first change
])
def test_a_compiled_step_has_no_graph_break_and_compiles_once_per_phase(method, extra, graphs):
    """torch.compile's tracing (dynamo, with a backend that counts the graphs it is given) over the epochs of a
    run: no graph break in a step (GenDD's Beta draw stays a tensor), no graph per epoch, the same losses as eager."""
    from torch._dynamo.utils import counters

    from gendd_pipe.distill.config import parse_run
    from gendd_pipe.distill.methods import TeacherHead, create_method
    from gendd_pipe.models.student import create_student

    cfg = parse_run({"method": method, "epochs": 4, "student": {"name": "resnet10t", "input_size": 32}, **extra}, "x")
    torch.manual_seed(0)
    model = create_method(cfg, create_student(cfg.student, 10), TeacherHead(torch.randn(10, 64), torch.randn(10), 5.0))
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 10, (8,)), "feature": torch.randn(8, 64),
             "logits": torch.randn(8, 10)}
    torch._dynamo.reset()
    counters.clear()
    given = []
    step = torch.compile(model, backend=lambda gm, inputs: given.append(gm) or gm.forward)
    seen = []
    for epoch in range(4):
        torch.manual_seed(epoch)
        loss = step(batch, epoch)["loss"].detach()
        torch.manual_seed(epoch)
        torch.testing.assert_close(loss, model(batch, epoch)["loss"].detach())
        seen.append(len(given))
    assert seen == graphs and not counters["graph_break"], dict(counters["graph_break"])
