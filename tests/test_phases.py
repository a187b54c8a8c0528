"""GenDD's stage 1 as a phase of its own, the schedules of each phase, and what the student's loader shows it.

Stage 1 (the official pretrain) has its own AdamW (betas 0.9 / 0.999) on a cosine
without warmup and trains on crops drawn afresh; stage 2 starts a fresh optimizer
with the run's warmup, schedule and beta2 ramp over its own steps. A run killed in
either phase resumes in it to the weights an uninterrupted run ends with. The
student trains on the store's random views (not the eval view) replayed with the
teacher's interpolation, so its uint8 pixels are the teacher's.
"""

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gendd_pipe import FeatureStore, GenddError
from gendd_pipe.data.loader import LoaderConfig, train_pipeline
from gendd_pipe.data.render import create_renderer
from gendd_pipe.data.shards import ShardReader, shard_name
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.distill.checkpoint import read_checkpoint
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.methods import TeacherHead, create_method, get_method
from gendd_pipe.distill.methods.gendd import GenddConfig
from gendd_pipe.distill.stage import DistillStage
from gendd_pipe.distill.stage import run_stage as distill_stage
from gendd_pipe.distill.stage1 import stage1_key
from gendd_pipe.distill.train import _beta2, distill, phase_optimizer
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.models.gendd_head import HeadConfig, SamplingConfig
from gendd_pipe.models.student import EvalTransform, StudentConfig, create_student
from gendd_pipe.models.teacher import TeacherConfig
from tests.test_distill import _cli_args, _kill_tree, _lines

SMALL_HEAD = HeadConfig(depth=1, width=64, diffusion_batch_mul=2)


def _gendd_cfg(**kwargs) -> DistillConfig:
    options = GenddConfig(**{"head": SMALL_HEAD, "predict": SamplingConfig(sampling_steps=4), "stage1_epochs": 2,
                             "stage1_lr": 3e-3, "stage1_min_lr": 1e-5, **kwargs.pop("gendd", {})})
    base = dict(method="gendd", student=StudentConfig("resnet10t", 32), epochs=5, lr=1e-2, min_lr=1e-4,
                warmup_epochs=1, beta2=(0.96, 0.999), loader=LoaderConfig(batch_size=16, shuffle_buffer=48))
    return DistillConfig(**{**base, **kwargs}, options=options)


def _schedule(method, phase, steps: int) -> list[tuple[float, float]]:
    """(lr, beta2) that each step of a phase uses, as the training loop sets them."""
    optimizer, scheduler = phase_optimizer(method, phase, steps)
    total, used = steps * phase.epochs, []
    for step in range(total):
        used.append((optimizer.param_groups[0]["lr"], _beta2(phase.beta2, step, total)))
        scheduler.step_update(step + 1)
    used.append((optimizer.param_groups[0]["lr"], None))  # what a step after the phase would use
    return used


def test_each_phase_has_its_own_optimizer_and_schedule():
    cfg = _gendd_cfg()
    method = create_method(cfg, create_student(cfg.student, 10),
                           TeacherHead(torch.randn(10, 512), torch.zeros(10), 20.0))  # resnet10t: 512 = 512
    stage1, stage2 = get_method("gendd").phases(cfg)
    assert (stage1.name, stage1.epochs, stage2.name, stage2.epochs) == ("stage1", 2, "stage2", 3)
    assert isinstance(method.stage1_proj, torch.nn.Identity)  # widths match: the official projection is none
    one = _schedule(method, stage1, steps=4)
    assert one[0] == (3e-3, 0.999) and one[7][1] == 0.999  # no warmup, the stage-1 lr; betas (0.9, 0.999)
    assert one[8][0] == pytest.approx(1e-5)  # cosine to the stage-1 min_lr
    two = _schedule(method, stage2, steps=4)
    assert two[0] == (pytest.approx(1e-4), 0.96)  # a fresh warmup from lr / 100, beta2 from its start
    assert two[4][0] == pytest.approx(1e-2)  # the peak after one warmup epoch (4 steps) ...
    assert two[11][1] == pytest.approx(0.999) and two[12][0] == pytest.approx(1e-4)  # ... cosine to min_lr
    groups = method.param_groups(cfg.weight_decay, "stage1")
    assert len(groups) == 1 and groups[0]["weight_decay"] == cfg.weight_decay
    assert not {id(p) for p in method.diffusion.parameters()} & {id(p) for p in groups[0]["params"]}
    decayed, head = method.param_groups(cfg.weight_decay, "stage2")
    assert head["weight_decay"] == 0 and {id(p) for p in method.projector.parameters()} <= {id(p) for p in
                                                                                           decayed["params"]}
    wide = create_method(cfg, create_student(cfg.student, 10), TeacherHead(torch.randn(10, 256), torch.zeros(10), 1.0))
    assert isinstance(wide.stage1_proj, torch.nn.Linear)


def test_a_step_schedule_drops_at_its_decay_epochs():
    cfg = _gendd_cfg(epochs=8, warmup_epochs=2, schedule="step", decay_epochs=(4, 5), decay_rate=0.1)
    method = create_method(cfg, create_student(cfg.student, 10), TeacherHead(torch.randn(10, 512), torch.zeros(10), 1))
    lrs = [lr for lr, _ in _schedule(method, get_method("gendd").phases(cfg)[1], steps=2)]  # stage 2: 6 epochs
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-2)  # warmup over 2 epochs of 2 steps
    assert lrs[7] == pytest.approx(1e-2) and lrs[8] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-4)


def test_stage1_reads_fresh_crops_and_the_run_records_its_phases(digit_store, tmp_path):
    store = FeatureStore.open(digit_store["store"])
    student = create_student(StudentConfig("resnet10t", 32), 1000)
    fresh = train_pipeline(digit_store["train"], store, student.data_config,
                           LoaderConfig(batch_size=16, num_workers=0), seed=0, fresh_scale=(0.2, 1.0))
    batch = next(iter(fresh))
    assert set(batch) == {"key", "image", "label"} and batch["image"].dtype == torch.uint8  # no teacher output
    again = next(iter(fresh))
    fresh.dataset.set_epoch(1)
    other = next(iter(fresh))
    assert torch.equal(batch["image"], again["image"]) and not torch.equal(batch["image"], other["image"])
    summary = distill(digit_store["store"], digit_store["train"], digit_store["val"], str(tmp_path), _gendd_cfg(
        epochs=3, gendd={"stage1_epochs": 1}), progress=False)
    lines = _lines(tmp_path)
    assert [m["phase"] for m in lines] == ["stage1", "stage2", "stage2"]
    assert set(lines[0]["train"]) == {"loss", "stage1_ce"} and "diffusion" in lines[1]["train"]
    assert lines[0]["lr"] == pytest.approx(1e-5)  # stage 1 ended at its own min_lr
    assert summary["best"]["epoch"] >= 2  # only stage-2 epochs compete for best.safetensors
    assert read_checkpoint(str(tmp_path / "last.safetensors"))["phase"] == "stage2"


KILLABLE = ["--epochs", "4", "--set", "distill.common.gendd.stage1_epochs=2", "--num-workers", "1"]


def _kill_after(proc, run, done: int, epoch_seconds: float) -> None:
    """SIGKILL ``proc`` a third into the epoch after ``done`` epochs of ``run`` are logged."""
    deadline = time.time() + 300
    while (not (run / "metrics.jsonl").exists() or len(_lines(run)) < done) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3 * epoch_seconds)
    _kill_tree(proc.pid)
    proc.wait()


def test_a_run_killed_in_either_phase_resumes_in_it(digit_store, tmp_path):
    """SIGKILL a real GenDD run (2 stage-1 epochs, then 2 of stage 2) in its second epoch, resume it, SIGKILL it
    again in its fourth: each resume takes up the phase it was killed in, with that phase's optimizer, and the
    run ends with an uninterrupted run's weights."""
    env, cli = {**os.environ, "OMP_NUM_THREADS": "1"}, [sys.executable, "-m", "gendd_pipe.cli"]
    whole = subprocess.run(cli + _cli_args(digit_store, tmp_path / "whole", *KILLABLE), env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    whole_run, killed_run = tmp_path / "whole" / "runs" / "gendd", tmp_path / "killed" / "runs" / "gendd"
    for done, phase, extra in ((1, "stage1", []), (3, "stage2", ["--resume"])):
        proc = subprocess.Popen(cli + _cli_args(digit_store, tmp_path / "killed", *KILLABLE, *extra), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_after(proc, killed_run, done, _lines(whole_run)[done]["train_seconds"])
        assert [m["epoch"] for m in _lines(killed_run)] == list(range(1, done + 1))
        assert read_checkpoint(str(killed_run / "last.safetensors"))["phase"] == phase
    again = subprocess.run(cli + _cli_args(digit_store, tmp_path / "killed", *KILLABLE, "--resume"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [(m["epoch"], m["phase"]) for m in _lines(killed_run)] == [(1, "stage1"), (2, "stage1"), (3, "stage2"),
                                                                      (4, "stage2")]
    a = read_checkpoint(str(whole_run / "last.safetensors"))
    b = read_checkpoint(str(killed_run / "last.safetensors"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.fixture(scope="module", params=[("resnet18.tv_in1k", "resnet10t"), ("resnet18", "resnet18.tv_in1k")],
                ids=["torchvision teacher, bilinear", "timm teacher, bicubic"])
def teacher_store(request, tmp_path_factory, digit_store):
    teacher, student = request.param
    out = str(tmp_path_factory.mktemp("interp") / "store.zarr")
    extract(digit_store["train"][:1], out, ExtractConfig(
        teacher=TeacherConfig(teacher, "none", input_size=32), dask_workers=0,
        views=ViewConfig(count=3, scale=(0.3, 1.0), hflip=0.5, seed=0)), progress=False)
    return {"store": out, "shards": digit_store["train"][:1], "student": student}


def test_the_student_sees_the_teachers_pixels(teacher_store):
    store = FeatureStore.open(teacher_store["store"])
    teacher_interpolation = store.manifest["preprocessing"]["interpolation"]
    student = create_student(StudentConfig(teacher_store["student"], 32), 1000)
    assert student.data_config["interpolation"] != teacher_interpolation  # the student's own would differ
    url = teacher_store["shards"][0]
    samples = {s.key: s for s in ShardReader(url, decode=False)}
    rows = store.read_shard(shard_name(url))
    row_of = {str(k): i for i, k in enumerate(rows["keys"])}
    render = create_renderer(store.manifest["views"]["renderer"])
    loader = train_pipeline(teacher_store["shards"], store, student.data_config,
                            LoaderConfig(batch_size=8, num_workers=0, shuffle_buffer=8), seed=0)
    seen, differ = set(), 0
    for batch in loader:
        for key, view, image in zip(batch["key"], batch["view"].tolist(), batch["image"]):
            views = rows["views"][row_of[key]][view][None]
            teacher = render(samples[key], views, (32, 32), teacher_interpolation)[0]  # as extraction renders it
            assert torch.equal(image, teacher), key
            own = render(samples[key], views, (32, 32), student.data_config["interpolation"])[0]
            differ += not torch.equal(image, own)
            seen.add(view)
    assert differ > 0 and 0 not in seen  # the eval view (0) is not a training view by default
    with_eval = train_pipeline(teacher_store["shards"], store, student.data_config,
                               LoaderConfig(batch_size=8, num_workers=0, eval_view=True), seed=0)
    assert 0 in {v for batch in with_eval for v in batch["view"].tolist()}


def test_an_eval_transform_sets_the_val_crop_and_interpolation():
    student = create_student(StudentConfig("resnet18", 224, eval=EvalTransform(256, "bilinear")), 10)
    assert student.data_config["crop_pct"] == 224 / 256 and student.data_config["interpolation"] == "bilinear"
    with pytest.raises(GenddError, match=r"student.eval.resize: 200 is smaller than resnet18's 224 px center crop"):
        create_student(StudentConfig("resnet18", eval=EvalTransform(200)), 10)  # timm's 224: checked on creation


def test_model_args_reach_timm_and_one_it_does_not_take_is_one_line():
    student = create_student(StudentConfig("mobilenetv1_100", 32, model_args={"act_layer": "relu"}), 10)
    assert {type(m).__name__ for m in student.modules()} >= {"ReLU"} and "ReLU6" not in {
        type(m).__name__ for m in student.modules()}
    with pytest.raises(GenddError, match=r"student.model_args: resnet18 does not take \['colour'\]"):
        create_student(StudentConfig("resnet18", 32, model_args={"colour": 1}), 10)


def test_a_store_of_one_view_leaves_nothing_to_train_on_but_its_eval_view(digit_store, tmp_path):
    out = str(tmp_path / "one.zarr")
    extract(digit_store["train"][:1], out, ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=32),
                                                         views=ViewConfig(count=1), dask_workers=0), progress=False)
    store, data_config = FeatureStore.open(out), create_student(StudentConfig("resnet10t", 32), 1000).data_config
    with pytest.raises(GenddError, match="one view per image, its eval view, which training leaves out; extract "
                                         "more views or set loader.eval_view: true"):
        train_pipeline(digit_store["train"][:1], store, data_config, LoaderConfig(batch_size=8), seed=0)
    batch = next(iter(train_pipeline(digit_store["train"][:1], store, data_config,
                                     LoaderConfig(batch_size=8, num_workers=0, eval_view=True), seed=0)))
    assert np.all(batch["view"].numpy() == 0)


def test_runs_of_one_stage1_share_it_and_end_as_if_each_had_trained_it(digit_store, tmp_path):
    """A sweep over stage-2 settings (head width, smooth) trains stage 1 once: the second run starts stage 2 from
    the first one's, and ends with the weights it reaches when it trains stage 1 itself."""
    gendd = {"head": {"depth": 1, "width": 64, "diffusion_batch_mul": 2}, "predict": {"sampling_steps": 4},
             "stage1_epochs": 1}
    common = {"method": "gendd", "epochs": 2, "warmup_epochs": 0, "student": {"name": "resnet10t", "input_size": 32},
              "loader": {"batch_size": 16, "shuffle_buffer": 48}, "gendd": gendd}
    runs = {"a": {}, "b": {"gendd": {"head": {"width": 32}, "smooth": 0.5}}}
    section = lambda out, only: DistillStage(store=digit_store["store"], shards=digit_store["train"],  # noqa: E731
                                             val_shards=digit_store["val"], out=str(out), common=common,
                                             runs={k: runs[k] for k in only})
    swept = section(tmp_path / "sweep", "ab")
    distill_stage(swept, "a", progress=False)
    cache = tmp_path / "sweep" / "stage1"
    assert len(list(cache.glob("*.safetensors"))) == 1
    distill_stage(swept, "b", progress=False)
    a, b = (_lines(tmp_path / "sweep" / "runs" / r) for r in "ab")
    assert a[0] == b[0] and [m["phase"] for m in b] == ["stage1", "stage2"]  # the shared epoch, its very timings
    assert len(list(cache.glob("*.safetensors"))) == 1
    distill_stage(section(tmp_path / "alone", "b"), "b", progress=False)  # b training its own stage 1
    shared, own = (read_checkpoint(str(tmp_path / d / "runs" / "b" / "last.safetensors")) for d in ("sweep", "alone"))
    assert all(torch.equal(shared["state_dict"][k], own["state_dict"][k]) for k in own["state_dict"])
    assert {**_lines(tmp_path / "alone" / "runs" / "b")[1]["val"], "seconds": 0} == {**b[1]["val"], "seconds": 0}
    cfg, store = swept.run("b"), FeatureStore.open(digit_store["store"])
    key = lambda c: stage1_key(c, get_method("gendd").phases(c)[0], store.manifest, digit_store["train"],  # noqa: E731
                               {"x": 1}, digit_store["val"], 1)
    assert key(cfg) == key(swept.run("a"))  # nothing of stage 2 enters the key ...
    assert key(cfg) != key(dataclasses.replace(cfg, seed=1))  # ... what stage 1 depends on does
    assert key(cfg) != key(dataclasses.replace(cfg, student=StudentConfig("resnet10t", 16)))
    scored_elsewhere = stage1_key(cfg, get_method("gendd").phases(cfg)[0], store.manifest, digit_store["train"],
                                  {"x": 1}, digit_store["train"], 1)
    assert key(cfg) != scored_elsewhere  # the kept metrics lines were scored on the val shards
