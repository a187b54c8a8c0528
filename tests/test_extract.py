import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from gendd_pipe import FeatureStore, GenddError
from gendd_pipe.data.shards import ShardReader
from gendd_pipe.data.render import render_view
from gendd_pipe.data.views import ViewConfig
from tests.helpers import to_tensor
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from tests.conftest import jpeg, write_tar

BUNDLED = TeacherConfig("tf_efficientnet_lite0", "bundled:efficientnet-lite0")
TINY = TeacherConfig("resnet18", "none", input_size=32)


def _cfg(teacher=BUNDLED, **kwargs) -> ExtractConfig:
    return ExtractConfig(teacher=teacher, views=ViewConfig(count=3, seed=1), dask_workers=0, **kwargs)


@pytest.fixture(scope="module")
def bundled_teacher():
    return create_teacher(BUNDLED)


@pytest.fixture
def photo_store(tmp_path, photo_shard):
    store = str(tmp_path / "store.zarr")
    extract([photo_shard], store, _cfg(logits="full"), progress=False)
    return store


def test_bundled_teacher_logits_rank_the_photos(photo_store):
    data = FeatureStore.open(photo_store).read_shard("photos-000000")
    top = dict(zip(data["keys"].tolist(), data["logits"][:, 0].astype(np.float32).argmax(-1).tolist()))
    assert 281 <= top["chelsea"] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top["coffee"] == 967  # espresso
    assert data["labels"].tolist() == [281, 967, 0, 0]


def test_view0_features_equal_an_independent_timm_forward(photo_store, photos):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(create_teacher(BUNDLED).model.state_dict())
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    data = FeatureStore.open(photo_store).read_shard("photos-000000")
    for row, key in enumerate(data["keys"].tolist()):
        x = transform(Image.open(io.BytesIO(jpeg(photos[key]))).convert("RGB"))[None]  # the bytes in the shard
        with torch.no_grad():
            ref = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
        ours = data["features"][row, 0].astype(np.float32)
        cosine = ref @ ours / (np.linalg.norm(ref) * np.linalg.norm(ours))
        assert cosine >= 0.999, key


def test_stored_views_replay_the_teacher_input(photo_store, photos, bundled_teacher):
    store = FeatureStore.open(photo_store)
    data = store.read_shard("photos-000000")
    dc = bundled_teacher.data_config
    for row, key in enumerate(data["keys"].tolist()):
        image = Image.open(io.BytesIO(jpeg(photos[key]))).convert("RGB")
        for view in (1, 2):
            x = to_tensor(render_view(image, data["views"][row, view], (224, 224), dc["interpolation"]), dc["mean"], dc["std"])
            features, logits = bundled_teacher(x[None])
            np.testing.assert_allclose(features[0].numpy(), data["features"][row, view].astype(np.float32), rtol=2e-2, atol=2e-2)
            np.testing.assert_allclose(logits[0].numpy(), data["logits"][row, view].astype(np.float32), rtol=2e-2, atol=5e-2)
        assert not np.allclose(data["features"][row, 1], data["features"][row, 0])


def test_head_reproduces_the_stored_logits(photo_store):
    store = FeatureStore.open(photo_store)
    weight, bias = store.head()
    data = store.read_shard("photos-000000")
    logits = data["features"].astype(np.float32) @ weight.T + bias
    np.testing.assert_allclose(logits, data["logits"].astype(np.float32), atol=0.1)


def test_store_opens_with_plain_zarr(photo_store):
    script = f"""
import json, sys, zarr
root = zarr.open_group({photo_store!r}, mode="r")
assert "gendd_pipe" not in sys.modules
m = root.attrs["gendd_pipe"]
s = root["shards/photos-000000"]
out = {{k: [list(a.shape), str(a.dtype)] for k, a in s.arrays()}}
out["head_weight"] = [list(root["teacher/head_weight"].shape), str(root["teacher/head_weight"].dtype)]
out["head_bias"] = [list(root["teacher/head_bias"].shape), str(root["teacher/head_bias"].dtype)]
out["complete"] = s.attrs["complete"]; out["count"] = s.attrs["count"]; out["version"] = m["format_version"]
out["keys"] = s["keys"][:].tolist()
print(json.dumps(out))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert out["features"] == [[4, 3, 1280], "float16"]
    assert out["logits"] == [[4, 3, 1000], "float16"]
    assert out["views"] == [[4, 3, 5], "float32"]
    assert out["labels"] == [[4], "int64"]
    assert out["keys"] == ["chelsea", "coffee", "astronaut", "rocket"]
    assert out["head_weight"] == [[1000, 1280], "float32"] and out["head_bias"] == [[1000], "float32"]
    assert out["complete"] is True and out["count"] == 4 and out["version"] == 2


def test_manifest_records_teacher_preprocessing_and_views(photo_store):
    m = FeatureStore.open(photo_store).manifest
    assert m["teacher"]["weights_sha256"] == create_teacher(BUNDLED).weights_sha256
    assert m["preprocessing"]["input_size"] == [3, 224, 224]
    assert m["preprocessing"]["interpolation"] == "bicubic" and m["preprocessing"]["crop_pct"] == 0.875
    assert m["views"]["count"] == 3 and m["views"]["seed"] == 1
    assert m["shards"][0]["name"] == "photos-000000" and m["shards"][0]["count"] == 4
    assert len(m["shards"][0]["source_sha256"]) == 64


def test_cc3m_layout_gets_label_minus_one_and_topk_logits(tmp_path, cc3m_shard):
    store = str(tmp_path / "cc3m.zarr")
    extract([cc3m_shard], store, _cfg(TINY, logits="topk:5"), progress=False)
    fs = FeatureStore.open(store)
    data = fs.read_shard("cc3m-000000")
    assert data["labels"].tolist() == [-1] * 4
    assert data["topk_values"].shape == (4, 3, 5) and data["topk_indices"].dtype == np.int32
    assert "logits" not in data
    weight, bias = fs.head()
    full = data["features"].astype(np.float32) @ weight.T + bias
    np.testing.assert_array_equal(full.argmax(-1), data["topk_indices"][..., 0])
    assert (np.diff(data["topk_values"].astype(np.float32), axis=-1) <= 0).all()
    lazy = fs.to_dask()
    assert lazy["features"].shape == (4, 3, 512) and float(lazy["features"].sum().compute()) == pytest.approx(
        float(data["features"].astype(np.float64).sum()), rel=1e-3)


def test_derived_logits_equal_the_full_logits_within_fp16_rounding(tmp_path, photo_store, photo_shard):
    derived = str(tmp_path / "derived.zarr")
    manifest = extract([photo_shard], derived, _cfg(), progress=False)  # auto: a linear classifier is derived
    assert manifest["logits"] == {"mode": "derived"} and manifest["format_version"] == 2
    full, derived = FeatureStore.open(photo_store), FeatureStore.open(derived)
    a, b = full.read_shard("photos-000000"), derived.read_shard("photos-000000")
    assert "logits" not in b and np.array_equal(a["features"], b["features"])
    stored, computed = full.logits(a), derived.logits(b)
    weight = derived.head()[0]
    # derived: the fp32 logits plus W (fp16 rounding of f); full: the fp32 logits rounded to fp16
    bound = (np.abs(b["features"].astype(np.float32)) * 2.0 ** -11) @ np.abs(weight).T + np.abs(stored) * 2.0 ** -11
    gap = np.abs(stored - computed)
    print(f"derived vs full logits: max gap {gap.max():.4f}, max bound {bound.max():.4f}")
    assert (gap <= 1.01 * bound + 1e-6).all(), (gap.max(), bound.min())
    assert gap.max() < 0.05 and (stored.argmax(-1) == computed.argmax(-1)).all()  # 0.0034 measured
    assert derived.root["shards/photos-000000"].attrs["count"] == 4
    assert sum(a.nbytes_stored() for _, a in derived.shard("photos-000000").arrays()) < 0.6 * sum(  # 1280 of 2280
        a.nbytes_stored() for _, a in full.shard("photos-000000").arrays())


def test_a_teacher_whose_classifier_is_not_linear_keeps_full_logits(tmp_path, digit_shards):
    dla = TeacherConfig("dla34", "none", input_size=32)  # a 1x1 convolution classifier
    with pytest.raises(GenddError, match="--logits derived: the classifier of dla34 is a Conv2d, not one linear"):
        extract(digit_shards[:1], str(tmp_path / "d.zarr"), _cfg(dla, logits="derived"), progress=False)
    manifest = extract(digit_shards[:1], str(tmp_path / "f.zarr"), _cfg(dla), progress=False)
    assert manifest["logits"] == {"mode": "full"}
    store = FeatureStore.open(str(tmp_path / "f.zarr"))
    data = store.read_shard(store.shard_names[0])
    teacher = create_teacher(dla)
    image = next(iter(ShardReader(digit_shards[0]))).image
    dc = teacher.data_config
    x = to_tensor(render_view(image, data["views"][0, 0], teacher.input_hw, dc["interpolation"]), dc["mean"], dc["std"])
    with torch.no_grad():
        logits = teacher.model(x[None].contiguous(memory_format=torch.channels_last))[0].numpy()
    np.testing.assert_allclose(data["logits"][0, 0].astype(np.float32), logits, rtol=1e-2, atol=1e-2)


def _bad_shard(tmp_path, photos):
    good = jpeg(photos["coffee"])
    samples = [
        {"__key__": "good-1", "jpg": good, "cls": 1},
        {"__key__": "broken", "jpg": b"\xff\xd8 not really a jpeg", "cls": 2},
        {"__key__": "label-only", "cls": 3},
        {"__key__": "good-2", "jpg": good, "cls": 4},
    ]
    return write_tar(tmp_path / "bad-000000.tar", samples)


def test_bad_samples_are_skipped_and_recorded(tmp_path, photos):
    store = str(tmp_path / "s.zarr")
    m = extract([_bad_shard(tmp_path, photos)], store, _cfg(TINY, on_error="skip"), progress=False)
    assert [s["key"] for s in m["skipped"]] == ["broken", "label-only"]
    assert "unreadable jpg" in m["skipped"][0]["reason"] and "no image" in m["skipped"][1]["reason"]
    assert FeatureStore.open(store).read_shard("bad-000000")["keys"].tolist() == ["good-1", "good-2"]


def test_bad_sample_fails_naming_shard_and_key(tmp_path, photos):
    with pytest.raises(GenddError, match=r"bad-000000.tar: sample broken: unreadable jpg"):
        extract([_bad_shard(tmp_path, photos)], str(tmp_path / "s.zarr"), _cfg(TINY), progress=False)


def test_truncated_tar_fails_or_keeps_every_complete_sample(tmp_path, digit_shards):
    data = open(digit_shards[0], "rb").read()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[: len(data) // 2])
    with tarfile.open(digit_shards[0]) as tar:  # samples whose every member lies before the cut
        ends: dict[str, int] = {}
        for m in tar.getmembers():
            key = m.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    whole = [k for k, end in ends.items() if end <= len(data) // 2]
    with pytest.raises(GenddError, match=rf"cut-000000.tar: tar breaks at byte \d+ after sample '{whole[-1]}'"):
        extract([str(cut)], str(tmp_path / "a.zarr"), _cfg(TINY), progress=False)
    m = extract([str(cut)], str(tmp_path / "b.zarr"), _cfg(TINY, on_error="skip"), progress=False)
    assert FeatureStore.open(str(tmp_path / "b.zarr")).read_shard("cut-000000")["keys"].tolist() == whole
    record = m["skipped"][-1]
    assert record["key"] is None and record["after"] == whole[-1] and 0 < record["offset"] <= len(data) // 2


def test_a_store_of_another_teacher_is_refused_and_kept(tmp_path, digit_shards):
    store = str(tmp_path / "s.zarr")
    extract(digit_shards[:1], store, _cfg(TINY), progress=False)
    before = FeatureStore.open(store).read_shard("train-000000")["features"]
    other = TeacherConfig("resnet18", "none", input_size=32, seed=7)
    with pytest.raises(GenddError, match=r"s.zarr: written with another teacher .*weights_sha256"):
        extract(digit_shards, store, _cfg(other), progress=False)
    with pytest.raises(GenddError, match=r"written with another preprocessing .*input_size"):
        extract(digit_shards, store, _cfg(TeacherConfig("resnet18", "none", input_size=40)), progress=False)
    with pytest.raises(GenddError, match=r"written with another views"):
        extract(digit_shards, store, ExtractConfig(teacher=TINY, views=ViewConfig(count=2), dask_workers=0), progress=False)
    after = FeatureStore.open(store)
    assert after.shard_names == ["train-000000"]
    np.testing.assert_array_equal(after.read_shard("train-000000")["features"], before)
    extract(digit_shards, store, _cfg(TINY), progress=False)  # the same recipe extends it
    assert FeatureStore.open(store).num_samples == 120


def test_dask_cluster_extraction_equals_in_process(tmp_path, digit_shards):
    cfg = _cfg(TINY, threads=1)
    extract(digit_shards, str(tmp_path / "local.zarr"), cfg, progress=False)
    from dataclasses import replace

    extract(digit_shards, str(tmp_path / "dask.zarr"), replace(cfg, dask_workers=2), progress=False)
    a, b = FeatureStore.open(str(tmp_path / "local.zarr")), FeatureStore.open(str(tmp_path / "dask.zarr"))
    assert a.shard_names == b.shard_names == ["train-000000", "train-000001", "train-000002"]
    for name in a.shard_names:
        for key, value in a.read_shard(name).items():
            np.testing.assert_array_equal(value, b.read_shard(name)[key])


def test_a_task_run_again_for_a_complete_shard_leaves_it_as_it_is(tmp_path, digit_shards):
    """Dask runs a finished task again when the worker holding its result is lost: the committed shard must
    stay readable the whole time, so the task must not rewrite it."""
    from pathlib import Path

    from gendd_pipe.config import narrow
    from gendd_pipe.shard_task import ShardConfig, extract_shard

    store = str(tmp_path / "s.zarr")
    manifest = extract(digit_shards[:1], store, _cfg(TINY), progress=False)
    files = sorted(p for p in Path(store, "shards", "train-000000").rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    reported = []
    entry = extract_shard(digit_shards[0], store, manifest, narrow(_cfg(TINY), ShardConfig), report=reported.append)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before and reported == []
    assert {k: entry[k] for k in ("name", "source", "count")} == {k: manifest["shards"][0][k] for k in ("name", "source", "count")}


def test_shard_reader_decodes_samples_and_hashes_the_source(digit_shards):
    reader = ShardReader(digit_shards[0])
    samples = list(reader)
    assert len(samples) == 40 and samples[0].image.mode == "RGB"
    import hashlib

    assert reader.sha256 == hashlib.sha256(open(digit_shards[0], "rb").read()).hexdigest()
