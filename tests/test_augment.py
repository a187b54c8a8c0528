"""Replayable color jitter, RandAugment and mix draws against torchvision's ColorJitter and timm's own
RandAugment, level functions and Mixup."""

import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, AugmentOp
from timm.data.mixup import Mixup
from torchvision.transforms import ColorJitter
from torchvision.transforms.functional import pil_to_tensor

from gendd_pipe.config import ConfigError, parse
from gendd_pipe.data.augment import (CUTMIX, MIXUP, NO_JITTER, NO_MIX, SKIPPED, UNREPLAYABLE, AugmentConfig,
                                     apply_jitter, apply_randaugment, draw_jitter, draw_mix, draw_randaugment, is_mixed,
                                     level_args, mix_pixels, mixed_target, parse_randaugment)
from gendd_pipe import seeds

RECIPE = "rand-m9-mstd0.5-inc1"


@pytest.mark.parametrize("name", sorted(set(LEVEL_TO_ARG) - UNREPLAYABLE))
def test_level_args_take_each_sign_timm_draws_and_no_other(name):
    op = AugmentOp(name, prob=1.0, magnitude=10, hparams={"translate_const": 100, "img_mean": (124, 116, 104)})
    random.seed(0)
    for magnitude in (0.0, 3.3, 7.0, 10.0):
        timm = {op.level_fn(magnitude, op.hparams) if op.level_fn else () for _ in range(64)}
        ours = {level_args(op, magnitude, negate) for negate in (False, True)}
        assert ours == timm, (name, magnitude)


def test_a_stored_randaugment_draw_replays_timm_ops_on_a_photo():
    augment = parse_randaugment(RECIPE, size=(96, 96))
    image = Image.fromarray(photos.astronaut()).resize((96, 96))
    draws = [draw_randaugment(augment, seeds.rng(3, "k", v)) for v in range(1, 40)]
    np.testing.assert_array_equal(draws[0], draw_randaugment(augment, seeds.rng(3, "k", 1)))  # from (seed, key, view)
    assert {int(i) for d in draws for i in d[:, 0]} >= set(range(8))  # ops spread over the set
    applied = [d for d in draws if (d[:, 1] != SKIPPED).all()]
    assert applied and any((d[:, 1] == SKIPPED).any() for d in draws)  # the layer probability of 0.5 at work
    draw = applied[0]
    expected = image
    for index, magnitude, negate in draw.tolist():  # timm's pixel functions with the stored arguments
        op = augment.ops[int(index)]
        expected = NAME_TO_OP[op.name](expected, *level_args(op, magnitude, negate >= 0.5), **op.kwargs)
    out = apply_randaugment(image, draw, augment)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert not np.array_equal(np.asarray(out), np.asarray(image))
    assert draw_randaugment(augment, seeds.rng(3, "k", 1)).shape == (2, 3)


def test_a_stored_color_jitter_is_torchvisions_color_jitter(monkeypatch):
    """The official BEiT loader's ColorJitter(0.4, 0.4, 0.4, 0.0): a stored draw replays torchvision's transform
    given the same parameters, and the draws spread as its get_params's do."""
    image = Image.fromarray(photos.coffee()).resize((64, 48))
    draws = np.stack([draw_jitter(0.4, seeds.rng(0, "k", v)) for v in range(1, 400)])
    np.testing.assert_array_equal(draws[0], draw_jitter(0.4, seeds.rng(0, "k", 1)))  # from (seed, key, view)
    assert {tuple(d[:3].astype(int)) for d in draws} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                                                         (2, 1, 0)}  # every order of the three ops
    assert draws[:, 3:].min() >= 0.6 and draws[:, 3:].max() <= 1.4 and abs(draws[:, 3:].mean() - 1) < 0.03
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.0)
    for draw in draws[:12]:
        order = [int(i) for i in draw[:3]]
        fn_idx = torch.tensor(order[:1] + [3] + order[1:])  # torchvision's permutation of four, hue (3) skipped
        monkeypatch.setattr(ColorJitter, "get_params", staticmethod(lambda *a, d=draw, f=fn_idx: (
            f, float(d[3]), float(d[4]), float(d[5]), None)))
        assert np.array_equal(np.asarray(apply_jitter(image, draw)), np.asarray(jitter(image)))
    assert np.array_equal(np.asarray(apply_jitter(image, NO_JITTER)), np.asarray(image))


@pytest.mark.parametrize("config", ["rand-m9-xyz", "augmix-m5", "rand-mX", "rand-m9-mstd0.5-tnone"])
def test_a_config_string_timm_does_not_parse_is_one_line(config):
    with pytest.raises(ConfigError, match="RandAugment config .* timm does not parse") as info:
        parse(AugmentConfig, {"randaugment": config}, "extract.augment")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["mixup", "cutmix"])
def test_alphas_below_zero_are_refused(key):
    with pytest.raises(ConfigError, match=key) as info:
        parse(AugmentConfig, {key: -0.2}, "extract.augment")
    assert "\n" not in str(info.value)


def _pair(size=(40, 48)):
    a = Image.fromarray(photos.astronaut()).resize(size[::-1])
    b = Image.fromarray(photos.coffee()).resize(size[::-1])
    return pil_to_tensor(a), pil_to_tensor(b)


def test_mixup_and_its_label_equal_timm_mixup_for_the_same_lambda_and_partner():
    a, b = _pair()
    cfg = AugmentConfig(mixup=0.2)
    mix = next(m for m in (draw_mix(cfg, seeds.rng(0, "k", v), 0, 8, (40, 48)) for v in range(50)) if 0.2 < m[2] < 0.8)
    assert int(mix[1]) == MIXUP and 1 <= mix[0] < 8
    lam = float(mix[2])
    timm = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.1, num_classes=10)
    timm._params_per_batch = lambda: (lam, False)  # the lambda timm would have drawn
    x, y = timm(torch.stack([a, b]).float(), torch.tensor([3, 7]))
    out = mix_pixels(a, b, mix)
    assert (out.float() - x[0]).abs().max() <= 0.5  # rounded to uint8
    torch.testing.assert_close(mixed_target(3, 7, lam, 10, 0.1), y[0], rtol=0, atol=1e-6)
    assert mixed_target(3, 7, lam, 10, 0.1).argmax() in (3, 7) and mixed_target(3, 7, lam, 10, 0.1)[7] > 0.01


def test_cutmix_pastes_the_box_and_its_label_uses_the_area_lambda_as_timm_does(monkeypatch):
    a, b = _pair()
    cfg = AugmentConfig(cutmix=1.0)
    mix = next(m for m in (draw_mix(cfg, seeds.rng(0, "k", v), 2, 8, (40, 48)) for v in range(50)) if 0.2 < m[2] < 0.8)
    assert int(mix[1]) == CUTMIX and mix[0] != 2
    top, left, bottom, right = (round(float(f) * n) for f, n in zip(mix[3:], (40, 48, 40, 48)))
    assert mix[2] == pytest.approx(1 - (bottom - top) * (right - left) / (40 * 48), abs=1e-6)
    timm = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode="batch", label_smoothing=0.1, num_classes=10)
    timm._params_per_batch = lambda: (float(mix[2]), True)
    monkeypatch.setattr("timm.data.mixup.cutmix_bbox_and_lam",  # the box timm would have drawn
                        lambda *args, **kwargs: ((top, bottom, left, right), float(mix[2])))
    x, y = timm(torch.stack([a, b]).float(), torch.tensor([1, 4]))
    assert torch.equal(mix_pixels(a, b, mix).float(), x[0])
    torch.testing.assert_close(mixed_target(1, 4, float(mix[2]), 10, 0.1), y[0], rtol=0, atol=1e-6)


def test_mix_probability_and_switch_follow_the_config():
    kinds = [draw_mix(AugmentConfig(mixup=0.2, cutmix=1.0), seeds.rng(0, f"k{i}", 1), 0, 4, (8, 8)) for i in range(400)]
    cut = sum(int(m[1]) == CUTMIX for m in kinds) / len(kinds)
    assert 0.4 < cut < 0.6 and all(is_mixed(m) for m in kinds)
    half = [draw_mix(AugmentConfig(mixup=0.2, mix_prob=0.5), seeds.rng(0, f"k{i}", 1), 0, 4, (8, 8)) for i in range(400)]
    assert 0.4 < sum(is_mixed(m) for m in half) / 400 < 0.6
    assert np.array_equal(draw_mix(AugmentConfig(), seeds.rng(0, "k", 1), 0, 4, (8, 8)), NO_MIX)
    unmixed = mixed_target(2, 2, 1.0, 5, 0.1)
    torch.testing.assert_close(unmixed, torch.tensor([0.02, 0.02, 0.92, 0.02, 0.02]))


# --- stores of augmented and mixed views -------------------------------------------------------------------------

from gendd_pipe import FeatureStore, GenddError  # noqa: E402
from gendd_pipe.data.loader import LoaderConfig, train_pipeline  # noqa: E402
from gendd_pipe.runtime import normalize_pixels  # noqa: E402
from gendd_pipe.data.replay import Replay  # noqa: E402
from gendd_pipe.data.shards import ShardReader  # noqa: E402
from gendd_pipe.data.views import ViewConfig, sample_views  # noqa: E402
from gendd_pipe.distill.config import DistillConfig  # noqa: E402
from gendd_pipe.distill.train import distill  # noqa: E402
from gendd_pipe.extract import ExtractConfig, extract  # noqa: E402
from gendd_pipe.models.student import StudentConfig  # noqa: E402
from gendd_pipe.models.teacher import TeacherConfig, create_teacher  # noqa: E402

TINY = TeacherConfig("resnet18", "none", input_size=48)


def _augmented(**augment) -> ExtractConfig:
    return ExtractConfig(teacher=TINY, views=ViewConfig(count=6, seed=2), dask_workers=0,
                         augment=AugmentConfig(**augment))


@pytest.mark.parametrize("augment", [{"randaugment": RECIPE}, {"randaugment": RECIPE, "mixup": 0.2},
                                     {"randaugment": RECIPE, "cutmix": 1.0},
                                     {"color_jitter": 0.4, "randaugment": RECIPE, "mixup": 0.2, "cutmix": 1.0}],
                         ids=["randaugment", "mixup", "cutmix", "color jitter, randaugment and mixes"])
def test_the_loader_renders_the_image_the_teacher_saw(tmp_path, photo_shard, augment):
    store_url = str(tmp_path / "aug.zarr")
    manifest = extract([photo_shard], store_url, _augmented(**augment), progress=False)
    jittered = augment.get("color_jitter", 0) > 0
    assert manifest["format_version"] == (4 if jittered else 3) and manifest["augment"]["randaugment"] == RECIPE
    assert ("color_jitter" in manifest["augment"]) == jittered  # version-3 manifests are written as before
    store = FeatureStore.open(store_url)
    data = store.read_shard("photos-000000")
    keys = list(data["keys"])
    teacher = create_teacher(TINY)
    dc = teacher.data_config
    loader = train_pipeline([photo_shard], store, dc, LoaderConfig(batch_size=len(keys), num_workers=0), seed=0,
                            soft_labels=True)
    seen = set()
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        batch = next(iter(loader))
        features, _ = teacher(normalize_pixels(batch["image"], dc["mean"], dc["std"]))
        for i, (key, v) in enumerate(zip(batch["key"], batch["view"].tolist())):
            assert v >= 1  # the eval view trains no augmented store
            row = keys.index(key)
            ref = data["features"][row, v].astype(np.float32)
            ours = features[i].numpy()
            assert ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref) >= 0.999, (key, v)
            if "mix" in data and is_mixed(data["mix"][row, v]):
                seen.add(int(data["mix"][row, v, 1]))
                partner = int(data["labels"][int(data["mix"][row, v, 0])])
                torch.testing.assert_close(batch["target"][i], mixed_target(int(data["labels"][row]), partner,
                                                                            float(data["mix"][row, v, 2]), 1000, 0.0))
                if partner != data["labels"][row] and 1e-6 < data["mix"][row, v, 2] < 1 - 1e-6:  # never the unmixed
                    # label (Beta(0.2, 0.2) often gives a lambda within float32's rounding of 0 or 1: a view that is
                    # its own image or its partner's)
                    assert batch["target"][i].max() < 1
    assert "mix" not in data or seen
    assert not jittered or (data["jitter"][:, 1:, 3:] != 1).all()  # every training view jittered, ...
    assert not jittered or (data["jitter"][:, 0] == NO_JITTER).all()  # ... the eval view not


def test_a_16_view_store_records_the_seeded_draws_and_the_loader_replays_them(tmp_path, photo_shard):
    """Every kind of draw of a 16-view store (crop and flip, color jitter, RandAugment, mix) is the one the seeded
    helper makes from (view seed, kind and key, view), and the loader's pixels of each epoch are the replay of the
    view the same helper picks from (training seed, epoch, key)."""
    cfg = _augmented(color_jitter=0.4, randaugment=RECIPE, mixup=0.2, cutmix=1.0)
    cfg = replace(cfg, views=replace(cfg.views, count=16))
    extract([photo_shard], str(tmp_path / "s.zarr"), cfg, progress=False)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    data, seed, dc = store.read_shard("photos-000000"), cfg.views.seed, create_teacher(TINY).data_config
    samples = {s.key: s for s in ShardReader(photo_shard, decode=False)}
    keys = [str(k) for k in data["keys"]]
    randaugment = parse_randaugment(RECIPE, dc["input_size"][1:], tuple(store.manifest["augment"]["fill"]),
                                    dc["interpolation"])
    for row, key in enumerate(keys):
        image = samples[key].image
        np.testing.assert_array_equal(data["views"][row], sample_views(key, *image.size, cfg.views, dc["input_size"][1:],
                                                                       dc["crop_pct"], dc["crop_mode"]))
        for v in range(1, 16):
            np.testing.assert_array_equal(data["jitter"][row, v], draw_jitter(0.4, seeds.rng(seed, f"jitter:{key}", v)))
            np.testing.assert_array_equal(data["augment"][row, v],
                                          draw_randaugment(randaugment, seeds.rng(seed, f"randaugment:{key}", v)))
            np.testing.assert_array_equal(data["mix"][row, v], draw_mix(cfg.augment, seeds.rng(seed, f"mix:{key}", v),
                                                                        row, len(keys), dc["input_size"][1:]))
    replay, partners = Replay(store.manifest, dc), [samples[k] for k in keys]
    arrays = {k: data[k] for k in ("views", "jitter", "augment", "mix")}
    loader = train_pipeline([photo_shard], store, dc, LoaderConfig(batch_size=len(keys), num_workers=0), seed=5)
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        batch = next(iter(loader))
        for i, (key, v) in enumerate(zip(batch["key"], batch["view"].tolist())):
            assert v == 1 + seeds.index(15, 5, epoch, key)
            row = keys.index(key)
            expected = replay.views(samples[key], {k: a[row] for k, a in arrays.items()}, partners, arrays, [v])[0]
            torch.testing.assert_close(batch["image"][i], expected, rtol=0, atol=0)


def test_the_first_views_of_a_store_are_a_smaller_store_and_the_loader_can_train_on_them(tmp_path, photo_shard,
                                                                                          caplog):
    """So that one extraction measures the views-per-image curve (benchmarks/views.py)."""
    augment = {"randaugment": RECIPE, "mixup": 0.2, "cutmix": 1.0}
    big, small = (str(tmp_path / f"{n}.zarr") for n in ("six", "three"))
    extract([photo_shard], big, _augmented(**augment), progress=False)
    extract([photo_shard], small, replace(_augmented(**augment), views=ViewConfig(count=3, seed=2)), progress=False)
    six, three = (FeatureStore.open(url) for url in (big, small))
    a, b = six.read_shard("photos-000000"), three.read_shard("photos-000000")
    for key in ("views", "augment", "mix", "features"):
        np.testing.assert_array_equal(a[key][:, :3], b[key], err_msg=key)
    dc = create_teacher(TINY).data_config
    cfg = LoaderConfig(batch_size=4, num_workers=0)
    with caplog.at_level("INFO", logger="gendd_pipe.data.loader"):
        first = train_pipeline([photo_shard], six, dc, replace(cfg, views=3), seed=0, soft_labels=True)
    encoded, features = os.path.getsize(photo_shard) / 2**20, 4 * 6 * 512 * 2 / 2**20  # resnet18: 512 features
    assert f"each loader worker holds one image shard (encoded, up to {encoded:.1f} MiB) and its teacher features " \
           f"(up to {features:.1f} MiB)" in caplog.text
    alone = train_pipeline([photo_shard], three, dc, cfg, seed=0, soft_labels=True)
    for epoch in range(4):
        first.dataset.set_epoch(epoch), alone.dataset.set_epoch(epoch)
        x, y = next(iter(first)), next(iter(alone))
        assert x["key"] == y["key"] and set(x["view"].tolist()) <= {1, 2}
        for key in ("view", "image", "feature", "target"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, msg=key)
    with pytest.raises(GenddError, match=r"six\.zarr: loader\.views 7: the store has 6 views per image; use at most 6$"):
        train_pipeline([photo_shard], six, dc, replace(cfg, views=7), seed=0)


def test_every_method_trains_from_a_mixed_store_and_dkd_is_refused_in_one_line(tmp_path, digit_shards):
    store_url = str(tmp_path / "mixed.zarr")
    extract(digit_shards[:2], store_url, _augmented(randaugment=RECIPE, mixup=0.2, cutmix=1.0), progress=False)
    head = {"head": {"width": 32, "depth": 1, "diffusion_batch_mul": 1}, "predict": {"sampling_steps": 2}}
    for method in ("ce", "kd", "gdkd", "gendd"):
        cfg = DistillConfig(method=method, student=StudentConfig("resnet10t", 32), epochs=1, warmup_epochs=0,
                            loader=LoaderConfig(batch_size=16, num_workers=0, label_smoothing=0.1),
                            options=head if method == "gendd" else None)
        summary = distill(store_url, digit_shards[:2], digit_shards[2:], str(tmp_path / method), cfg, progress=False)
        assert summary["last"]["epoch"] == 1
    cfg = DistillConfig(method="dkd", student=StudentConfig("resnet10t", 32), epochs=1)
    with pytest.raises(GenddError, match="views are mixed.*method dkd needs one target class") as info:
        distill(store_url, digit_shards[:2], digit_shards[2:], str(tmp_path / "dkd"), cfg, progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "dkd" / "last.safetensors").exists()


def test_a_shard_of_one_sample_has_no_partner_and_is_refused_in_one_line(tmp_path, mnist_records):
    from tests.conftest import write_shards

    shards = write_shards(mnist_records[:1], str(tmp_path / "one"), "train", 1)
    with pytest.raises(GenddError, match="train-000000.tar: 1 readable sample.*partner") as info:
        extract(shards, str(tmp_path / "s.zarr"), _augmented(mixup=0.2), progress=False)
    assert "\n" not in str(info.value)


def test_augment_needs_a_second_view_and_randaugment_the_pil_renderer():
    with pytest.raises(ConfigError, match="views.count to 2"):
        parse(ExtractConfig, {"views": {"count": 1}, "augment": {"mixup": 0.2}}, "extract")
    with pytest.raises(ConfigError, match="renderer pil"):
        parse(ExtractConfig, {"views": {"renderer": "tensor"}, "augment": {"randaugment": RECIPE}}, "extract")
    with pytest.raises(ConfigError, match="augment.color_jitter: replayed with torchvision's functions on Pillow"):
        parse(ExtractConfig, {"views": {"renderer": "tensor"}, "augment": {"color_jitter": 0.4}}, "extract")


def test_verify_recompute_replays_augmented_and_mixed_views(tmp_path, photo_shard):
    from gendd_pipe.verify import verify

    store_url = str(tmp_path / "aug.zarr")
    extract([photo_shard], store_url, _augmented(color_jitter=0.4, randaugment=RECIPE, mixup=0.2, cutmix=1.0),
            progress=False)
    report = verify(FeatureStore.open(store_url), recompute_count=4)
    assert report["ok"] and report["recomputed"] == 4 and report["cosine_min"] >= 0.999, report


def test_the_cli_extracts_mixed_views_and_distills_from_the_first_of_them(tmp_path, digit_store):
    import yaml
    from typer.testing import CliRunner

    from gendd_pipe.cli import app

    runner, store = CliRunner(), str(tmp_path / "cli.zarr")
    made = runner.invoke(app, ["extract", digit_store["train"][0], "--out", store, "--teacher", "resnet18", "--weights",
                               "none", "--input-size", "32", "--views", "4", "--randaugment", RECIPE, "--mixup", "0.2",
                               "--cutmix", "1.0", "--dask-workers", "0", "-q"])
    assert made.exit_code == 0, made.output
    manifest = FeatureStore.open(store).manifest
    assert manifest["augment"]["randaugment"] == RECIPE and manifest["views"]["count"] == 4
    assert (manifest["augment"]["mixup"], manifest["augment"]["cutmix"]) == (0.2, 1.0)
    trained = runner.invoke(app, ["distill", "--store", store, "--shards", digit_store["train"][0], "--val-shards",
                                  digit_store["val"][0], "--out", str(tmp_path / "runs"), "--method", "kd",
                                  "--student", "resnet10t", "--input-size", "16", "--epochs", "1", "--batch-size", "16",
                                  "--warmup-epochs", "0", "--num-workers", "0", "--views", "2", "--smoothing", "0.1",
                                  "-q"])
    assert trained.exit_code == 0, trained.output
    with open(tmp_path / "runs" / "runs" / "kd" / "config.yaml") as f:
        loader = yaml.safe_load(f)["runs"]["kd"]["loader"]
    assert (loader["views"], loader["label_smoothing"]) == (2, 0.1)
