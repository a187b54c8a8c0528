"""Real short distillations from a real store: every method, the CLI, evaluate, resume after SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from gendd_pipe import GenddError
from gendd_pipe.cli import app
from gendd_pipe import FeatureStore
from gendd_pipe.runtime import RuntimeConfig, network_input
from gendd_pipe.data.loader import LoaderConfig, train_pipeline
from gendd_pipe.distill.checkpoint import read_checkpoint
from gendd_pipe.distill.evaluate import evaluate, load_method
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.evaluate import EvaluateStage, evaluate_checkpoint
from gendd_pipe.distill.evaluate import run_stage as evaluate_stage
from gendd_pipe.distill.methods.gendd import GenddConfig
from gendd_pipe.distill.methods.logit import LogitConfig
from gendd_pipe.distill.stage import DistillStage
from gendd_pipe.distill.stage import run_stage as distill_stage
from gendd_pipe.distill.train import distill
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.models.gendd_head import HeadConfig, SamplingConfig
from gendd_pipe.models.student import StudentConfig
from gendd_pipe.models.teacher import TeacherConfig
from gendd_pipe.report import collect, markdown
from gendd_pipe.data.views import ViewConfig
from tests.helpers import per_row_net

SMALL_GENDD = GenddConfig(head=HeadConfig(depth=1, width=64, diffusion_batch_mul=2),
                          predict=SamplingConfig(sampling_steps=4))


def _cfg(method, options=None, **kwargs):
    base = dict(method=method, student=StudentConfig("resnet10t", 32), epochs=2, lr=3e-3, warmup_epochs=0,
                loader=LoaderConfig(batch_size=16, shuffle_buffer=48))
    if options is None:
        options = SMALL_GENDD if method == "gendd" else LogitConfig(warmup_epochs=1)
    return DistillConfig(**{**base, **kwargs}, options=options)


def _run(digit_store, out, cfg, **kwargs):
    return distill(digit_store["store"], digit_store["train"], digit_store["val"], str(out), cfg, progress=False,
                   **kwargs)


def _lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "gdkd", "gendd"])
def test_every_method_trains_and_reports_best_and_last(digit_store, tmp_path, method):
    summary = _run(digit_store, tmp_path, _cfg(method))
    lines = _lines(tmp_path)
    assert [m["epoch"] for m in lines] == [1, 2]
    assert summary["best"]["epoch"] in (1, 2) and summary["last"]["epoch"] == 2
    predictors = {"student", "gendd"} if method == "gendd" else {"student"}
    assert set(lines[-1]["val"]) - {"images", "seconds"} == predictors
    assert lines[-1]["images_per_s"] > 0 and lines[-1]["val"]["images"] == 48
    assert os.path.exists(tmp_path / "last.safetensors") and os.path.exists(tmp_path / "best.safetensors")
    if method in ("kd", "dkd", "gdkd"):
        assert lines[-1]["train"]["kd"] > 0


def test_training_loss_falls(digit_store, tmp_path):
    _run(digit_store, tmp_path / "ce", _cfg("ce", epochs=4))
    ce = [m["train"]["loss"] for m in _lines(tmp_path / "ce")]
    assert ce[-1] < 0.8 * ce[0]
    # the diffusion loss is heavy-tailed per step (its t = 0 term), so the head is scored on fixed
    # timesteps and noise: a fresh head predicts eps = 0 (MSE 1); a trained one does better
    _run(digit_store, tmp_path / "gendd", _cfg("gendd", epochs=4, lr=1e-3))
    method, _, _ = load_method(str(tmp_path / "gendd" / "last.safetensors"))
    store = FeatureStore.open(digit_store["store"])
    batch = next(iter(train_pipeline(digit_store["train"], store, method.student.data_config,
                                     LoaderConfig(48, 48), seed=0, epoch=0)))
    with torch.no_grad():
        images = network_input(batch["image"], method.student.data_config, RuntimeConfig(), torch.device("cpu"))
        cond = method.projector(method.student.features(images))
        tokens, conds, pos = method.diffusion.tokenize(method.contract(batch["feature"], batch["label"]), cond)
        torch.manual_seed(0)
        t = torch.randint(1, 1000, (tokens.shape[0],))
        mse = method.diffusion.train_diffusion.training_losses(
            lambda x, ts: per_row_net(method.diffusion.net, x, ts, conds, pos), tokens, t)["mse"].mean().item()
    assert mse < 0.9


def test_unsupervised_runs_use_no_label_and_score_a_probe(digit_store, tmp_path):
    summary = _run(digit_store, tmp_path, _cfg("kd", unsupervised=True, epochs=1))
    line = _lines(tmp_path)[0]
    assert line["train"]["ce"] == 0.0 and "probe" in line["val"] and summary["primary"] == "probe"


def test_mismatches_are_refused_in_one_line(digit_store, tmp_path, cc3m_shard):
    with pytest.raises(ValueError, match="dkd needs labels and cannot run unsupervised"):
        _cfg("dkd", unsupervised=True)
    topk = str(tmp_path / "topk.zarr")
    extract(digit_store["train"], topk, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                                                      logits="topk:5", dask_workers=0), progress=False)
    with pytest.raises(GenddError, match="kd needs full teacher logits but the store keeps topk logits"):
        distill(topk, digit_store["train"], digit_store["val"], str(tmp_path / "b"), _cfg("kd"), progress=False)
    unlabeled = str(tmp_path / "cc3m.zarr")
    extract([cc3m_shard], unlabeled, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                                                   dask_workers=0), progress=False)
    with pytest.raises(GenddError, match="cc3m-000000 has unlabeled samples .* method gendd is supervised"):
        distill(unlabeled, [cc3m_shard], [cc3m_shard], str(tmp_path / "c"), _cfg("gendd"), progress=False)
    _run(digit_store, tmp_path / "d", _cfg("ce", epochs=1))
    with pytest.raises(GenddError, match="holds a run already"):
        _run(digit_store, tmp_path / "d", _cfg("ce", epochs=1))
    with pytest.raises(GenddError, match=r"was trained with other settings \(lr\)"):
        _run(digit_store, tmp_path / "d", _cfg("ce", epochs=2, lr=1e-2), resume=True)


def _cli_args(digit_store, out, *extra):
    """A small GenDD run: its method settings through --set, as the CLI has typed options for common settings only."""
    args = ["distill", "--store", digit_store["store"], "--out", str(out), "--student", "resnet10t",
            "--input-size", "32", "--method", "gendd", "--batch-size", "16", "--warmup-epochs", "0", "-q",
            "--set", "distill.common.gendd.head={width: 64, depth: 1, diffusion_batch_mul: 2}",
            "--set", "distill.common.gendd.predict.sampling_steps=4"]
    for shard in digit_store["train"]:
        args += ["--shards", shard]
    return args + ["--val-shards", digit_store["val"][0], *extra]


def test_cli_distill_then_evaluate(digit_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, _cli_args(digit_store, tmp_path / "d", "--epochs", "1"))
    assert result.exit_code == 0, result.output
    assert "best epoch 1: top-1 student" in result.output and "images/s" in result.output
    run = tmp_path / "d" / "runs" / "gendd"
    assert (run / "last.safetensors").exists() and (tmp_path / "d" / "metrics" / "gendd.json").exists()
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.safetensors"), "--val-shards", digit_store["val"][0],
                                 "--train-shards", digit_store["train"][0], "--out", str(tmp_path / "eval"),
                                 "--set", "evaluate.predict.gendd={sampling_steps: 2, samples: 2, sampler: ddim}"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "gendd.json").read_text())
    assert {"student", "gendd", "probe"} <= set(report) and report["images"] == 48
    assert 0 <= report["probe"]["top1"] <= 100
    assert report["predict"] == {"sampling_steps": 2, "cfg": 2.0, "temperature": 1.0, "sampler": "ddim", "samples": 2}
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.safetensors"), "--val-shards",
                                 digit_store["val"][0], "--input-size", "64"])
    assert result.exit_code == 1 and "trained at input 32x32, not 64" in result.output
    result = runner.invoke(app, _cli_args(digit_store, tmp_path / "x", "--set", "distill.common.gendd.centers=wide"))
    assert result.exit_code == 1
    assert "distill.common.gendd.centers: must be one of 'raw' or 'scaled', got 'wide'" in result.output


def test_stages_write_their_metrics(digit_store, tmp_path):
    section = DistillStage(store=digit_store["store"], shards=digit_store["train"], val_shards=digit_store["val"],
                           out=str(tmp_path / "distill"),
                           common={"epochs": 1, "warmup_epochs": 0, "student": {"name": "resnet10t", "input_size": 32},
                                   "loader": {"batch_size": 16}},
                           runs={"kd": {}, "kd-t2": {"method": "kd", "logit": {"temperature": 2.0}}})
    summary = distill_stage(section, "kd-t2", progress=False)
    written = json.load(open(tmp_path / "distill" / "metrics" / "kd-t2.json"))
    assert written["last"] == summary["last"] and written["method"] == "kd" and written["epochs"] == 1
    ckpt = read_checkpoint(str(tmp_path / "distill" / "runs" / "kd-t2" / "last.safetensors"))
    assert ckpt["config"]["logit"]["temperature"] == 2.0  # the run's keys over distill.common
    curve = (tmp_path / "distill" / "plots" / "kd-t2.csv").read_text().splitlines()
    assert curve[0] == "epoch,loss,student" and curve[1].startswith("1,")
    per_epoch = (tmp_path / "distill" / "runs" / "kd-t2" / "metrics.csv").read_text().splitlines()
    assert "val/student/top1" in per_epoch[0].split(",") and len(per_epoch) == 2
    scoring = EvaluateStage(distill=str(tmp_path / "distill"), val_shards=digit_store["val"], out=str(tmp_path / "eval"))
    result = evaluate_stage(scoring, "kd-t2")
    assert result["student"]["top1"] == pytest.approx(summary["last"]["student"]["top1"])
    assert result["best"]["student"]["top1"] == pytest.approx(summary["best"]["student"]["top1"])  # both scored
    assert json.load(open(tmp_path / "eval" / "kd-t2.json"))["run"] == "kd-t2"
    data = collect(str(tmp_path / "distill"), str(tmp_path / "eval"), ["kd-t2"])
    table = markdown(data)
    best, last = result["best"]["student"]["top1"], result["student"]["top1"]
    assert "student head top-1 (best / last)" in table and f"| {best:.2f} / {last:.2f} |" in table
    with pytest.raises(GenddError, match="distill.runs: no run 'dkd'"):
        distill_stage(section, "dkd")


@pytest.mark.slow
def test_bf16_autocast_trains_and_resumes_under_bf16_alone(digit_store, tmp_path):
    """A run under bf16 autocast (the CPU runs the GPU's code path) records its precision; a resume under another
    precision is refused in one line and overwrites nothing, one on another placement continues; its sampled
    evaluation repeats."""
    _run(digit_store, tmp_path, _cfg("gendd", epochs=1, runtime=RuntimeConfig(amp="bf16", channels_last=False)))
    ckpt = read_checkpoint(str(tmp_path / "last.safetensors"))
    assert ckpt["config"]["runtime"]["amp"] == "bf16"
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())  # float32 weights, the autocast only in the forward
    before = (tmp_path / "last.safetensors").read_bytes()
    with pytest.raises(GenddError, match=r"last.safetensors: was trained with other settings \(runtime.amp \(bf16, "
                                         r"not off\)\); resume it with the same settings"):
        _run(digit_store, tmp_path, _cfg("gendd", epochs=2), resume=True)
    assert (tmp_path / "last.safetensors").read_bytes() == before
    moved = RuntimeConfig(device="cpu", amp="bf16", channels_last=True)  # another memory format and device name
    _run(digit_store, tmp_path, _cfg("gendd", epochs=2, runtime=moved), resume=True)
    assert [m["epoch"] for m in _lines(tmp_path)] == [1, 2]
    method = load_method(str(tmp_path / "last.safetensors"))[0]
    state = torch.random.get_rng_state()
    scored, again = (evaluate(method, digit_store["val"], runtime=RuntimeConfig(amp="bf16")) for _ in range(2))
    assert scored["images"] == 48 and 0 <= scored["gendd"]["top1"] <= 100
    assert {**scored, "seconds": 0} == {**again, "seconds": 0}  # GenDD's sampled scores repeat ...
    assert torch.equal(torch.random.get_rng_state(), state)  # ... drawn apart from the caller's generator


@pytest.mark.cuda
def test_a_checkpoint_moves_between_the_gpu_and_the_cpu(digit_store, tmp_path):
    for first, then in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / first
        _run(digit_store, out, _cfg("gendd", epochs=1, runtime=RuntimeConfig(device=first, amp="bf16")))
        _run(digit_store, out, _cfg("gendd", epochs=2, runtime=RuntimeConfig(device=then, amp="bf16")), resume=True)
        assert [m["epoch"] for m in _lines(out)] == [1, 2]


@pytest.mark.cuda
def test_fp16_training_keeps_its_scaler_state_in_the_checkpoint(digit_store, tmp_path):
    """The gradient scaler of an fp16 run is active (a scale, a growth tracker) and its state is what the next
    epoch goes on from; a bf16 run's is the disabled scaler's empty state."""
    fp16 = tmp_path / "fp16"
    _run(digit_store, fp16, _cfg("kd", epochs=1, runtime=RuntimeConfig(device="cuda", amp="fp16")))
    scaler = read_checkpoint(str(fp16 / "last.safetensors"))["scaler"]
    steps = 96 // 16  # of an epoch; each halves the scale (a skipped step, the tracker reset) or counts one more
    skipped = round(math.log2(65536.0 / scaler["scale"]))
    assert scaler["scale"] == 65536.0 * 2.0 ** -skipped and 0 <= skipped <= steps
    assert scaler["_growth_tracker"] + skipped <= steps and scaler["_growth_tracker"] + skipped >= 1
    _run(digit_store, fp16, _cfg("kd", epochs=2, runtime=RuntimeConfig(device="cuda", amp="fp16")), resume=True)
    again = read_checkpoint(str(fp16 / "last.safetensors"))["scaler"]  # went on from epoch 1's state
    assert again["scale"] < scaler["scale"] or again["_growth_tracker"] == scaler["_growth_tracker"] + steps
    bf16 = tmp_path / "bf16"
    _run(digit_store, bf16, _cfg("kd", epochs=1, runtime=RuntimeConfig(device="cuda", amp="bf16")))
    assert read_checkpoint(str(bf16 / "last.safetensors"))["scaler"] == {}


def test_a_killed_run_resumes_to_the_same_weights(digit_store, tmp_path):
    """SIGKILL a real distill run (every process of it: its loader workers too) in the middle of its second
    epoch; --resume ends where an uninterrupted run ends, and the metrics hold each epoch once. Two ranks on two
    nodes, killed alike: `tests/test_nodes.py`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gendd_pipe.cli"]
    whole = subprocess.run(cmd + _cli_args(digit_store, tmp_path / "whole", "--epochs", "3"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    whole_run, killed_run = tmp_path / "whole" / "runs" / "gendd", tmp_path / "killed" / "runs" / "gendd"
    proc = subprocess.Popen(cmd + _cli_args(digit_store, tmp_path / "killed", "--epochs", "3"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed_run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and (killed_run / "last.safetensors").exists()) and time.time() < deadline:
        time.sleep(0.05)
    # a third of the way through epoch 2's training steps, as long as they took in the uninterrupted run (epoch 1's
    # own time holds the loader workers' start, longer than a whole later epoch on a loaded machine)
    time.sleep(0.3 * _lines(whole_run)[1]["train_seconds"])
    _kill_tree(proc.pid)
    proc.wait()
    assert [m["epoch"] for m in _lines(killed_run)] == [1]
    again = subprocess.run(cmd + _cli_args(digit_store, tmp_path / "killed", "--epochs", "3", "--resume"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [m["epoch"] for m in _lines(killed_run)] == [1, 2, 3]
    a = read_checkpoint(str(whole_run / "last.safetensors"))
    b = read_checkpoint(str(killed_run / "last.safetensors"))
    assert a["distributed"]["world_size"] == b["distributed"]["world_size"] == 1
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a lost node loses them."""
    import psutil

    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree[1:], timeout=30)


@pytest.mark.slow
def test_torchrun_with_two_processes(digit_store, tmp_path):
    """Two real torchrun processes (gloo): the global batch split by rank, DDP gradients, validation split
    across the ranks and summed (it scores as one process scores the same checkpoint), rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gendd_pipe.cli",
           *_cli_args(digit_store, tmp_path / "ddp", "--epochs", "2", "--method", "kd", "-r", "kd")]  # not --run
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = _lines(tmp_path / "ddp" / "runs" / "kd")
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["val"]["images"] == 48
    assert os.path.exists(tmp_path / "ddp" / "runs" / "kd" / "summary.json")
    ckpt = read_checkpoint(str(tmp_path / "ddp" / "runs" / "kd" / "last.safetensors"))
    assert ckpt["distributed"] == {"world_size": 2, "rank_batch": 8, "batch_size": 16}
    alone = evaluate_checkpoint(str(tmp_path / "ddp" / "runs" / "kd" / "last.safetensors"), digit_store["val"])
    assert alone["student"] == lines[-1]["val"]["student"]


@pytest.mark.slow
def test_torchrun_stage_entry_point_clears_and_writes_on_rank_0(digit_store, tmp_path):
    """``torchrun -m stages.distill``, as DVC would run it on two processes: run again with other settings,
    rank 0 alone clears the stale run and writes; the metrics file is one valid JSON document."""
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "distill"
    for lr in (2e-3, 1e-3):
        params = tmp_path / f"params-{lr}.yaml"
        params.write_text(yaml.safe_dump({"distill": {
            "store": digit_store["store"], "shards": digit_store["train"], "val_shards": digit_store["val"],
            "out": str(out), "common": {"epochs": 1, "lr": lr, "warmup_epochs": 0, "loader": {"batch_size": 16},
                                        "student": {"name": "resnet10t", "input_size": 32}},
            "runs": {"kd": {}}}}))
        done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "stages.distill", "kd",
                               "--params", str(params)], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert json.load(open(out / "metrics" / "kd.json"))["epochs"] == 1
    assert [m["epoch"] for m in _lines(out / "runs" / "kd")] == [1]  # the first run's epoch was cleared
    assert read_checkpoint(str(out / "runs" / "kd" / "last.safetensors"))["config"]["lr"] == 1e-3


@pytest.fixture(scope="module")
def full_store(digit_store, tmp_path_factory):
    """The digit store's extraction again with full logits stored (the digit store derives them)."""
    store = str(tmp_path_factory.mktemp("full") / "full.zarr")
    cfg = ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32), logits="full",
                        views=ViewConfig(count=3, scale=(0.5, 1.0), hflip=0.0, seed=0), dask_workers=0)
    extract(digit_store["train"] + digit_store["val"], store, cfg, progress=False)
    return store


def test_kd_from_derived_logits_matches_kd_from_stored_logits(digit_store, full_store, tmp_path):
    assert FeatureStore.open(digit_store["store"]).logits_mode == "derived"
    _run(digit_store, tmp_path / "derived", _cfg("kd", epochs=1))
    distill(full_store, digit_store["train"], digit_store["val"], str(tmp_path / "full"), _cfg("kd", epochs=1),
            progress=False)
    a, b = _lines(tmp_path / "derived")[0], _lines(tmp_path / "full")[0]
    assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-3), (a, b)
    wa = read_checkpoint(str(tmp_path / "derived" / "last.safetensors"))["state_dict"]
    wb = read_checkpoint(str(tmp_path / "full" / "last.safetensors"))["state_dict"]
    weights = [k for k in wa if wa[k].is_floating_point()]
    a_all, b_all = (torch.cat([w[k].float().flatten() for k in weights]) for w in (wa, wb))
    assert float((a_all - b_all).norm() / b_all.norm()) < 1e-2  # the same run up to the logits' fp16 rounding
    assert abs(a["val"]["student"]["top1"] - b["val"]["student"]["top1"]) <= 100 / 48 + 1e-9  # one val digit


def test_a_version_1_store_opens_and_distills_as_before(digit_store, full_store, tmp_path):
    import shutil

    from gendd_pipe.store.format import MANIFEST_ATTR
    from gendd_pipe.store.writer import open_root

    old = str(tmp_path / "v1.zarr")
    shutil.copytree(full_store, old)
    root = open_root(old)  # version 1: the same layout, no compute section
    root.attrs[MANIFEST_ATTR] = {**{k: v for k, v in root.attrs[MANIFEST_ATTR].items() if k != "compute"},
                                 "format_version": 1}
    summary = distill(old, digit_store["train"], digit_store["val"], str(tmp_path / "run"), _cfg("kd", epochs=1),
                      progress=False)
    assert summary["last"]["epoch"] == 1
    cfg = ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32), logits="full",
                        views=ViewConfig(count=3, scale=(0.5, 1.0), hflip=0.0, seed=0), dask_workers=0)
    with pytest.raises(GenddError, match="format version 1 cannot be extended by this version"):
        extract(digit_store["train"], old, cfg, progress=False)


def test_gdkd_needs_a_top_k_smaller_than_the_class_count(digit_store, tmp_path):
    with pytest.raises(GenddError, match="gdkd: k=1000 must be between 1 and the class count minus one"):
        _run(digit_store, tmp_path, _cfg("gdkd", options=LogitConfig(k=1000)))
