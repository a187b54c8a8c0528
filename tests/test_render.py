"""Renderers, the prefetching pipeline, incremental shard writing and the int8 feature codec."""

import threading
import time

import numpy as np
import pytest
import torch
import zarr

from gendd_pipe import FeatureStore, GenddError
from gendd_pipe.data.loader import LoaderConfig, train_pipeline
from gendd_pipe.data.render import RENDERERS, decode_tensor, prefetched, render_pil, render_tensor
from gendd_pipe.data.shards import ShardReader
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.store.format import MANIFEST_ATTR, dequantize_int8, quantize_int8
from gendd_pipe.store.writer import open_root
from tests.helpers import model_input, schema_of, write_shard
from gendd_pipe.runtime import RuntimeConfig, network_input
from tests.conftest import write_tar

cuda = pytest.mark.cuda
TEACHER = TeacherConfig("resnet18", "none", input_size=64)
BOX = np.array([[0.1, 0.2, 0.6, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]], np.float32)


def _cfg(**kwargs) -> ExtractConfig:
    kwargs = {"views": ViewConfig(count=3), "chunk_size": 4, **kwargs}
    return ExtractConfig(teacher=TEACHER, logits="derived", dask_workers=0, batch_size=8, **kwargs)


def _samples(url: str, decode: bool = False):
    return [s for s in ShardReader(url, decode=decode)]


def test_prefetched_keeps_order_and_runs_ahead_on_threads():
    seen = set()

    def slow(i):
        seen.add(threading.current_thread().name)
        time.sleep(0.01 * (i % 3))
        return i * i

    assert list(prefetched(slow, range(40), threads=4, ahead=8)) == [i * i for i in range(40)]
    assert len(seen) > 1 and all(name.startswith("render") for name in seen)


def test_prefetched_raises_where_the_failing_item_was_and_stops_early():
    def items():
        yield from range(5)
        raise GenddError("shard x: cannot open")

    got = []
    with pytest.raises(GenddError, match="cannot open"):
        for value in prefetched(lambda i: i, items(), threads=2, ahead=2):
            got.append(value)
    assert got == list(range(5))
    drawn = []

    def endless():
        for i in range(10**6):
            drawn.append(i)
            yield i

    stream = prefetched(lambda i: i, endless(), threads=2, ahead=3)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the consumer stops: the drawer stops too, not a million items later
    assert len(drawn) < 50


def test_both_renderers_cut_the_same_view(photo_shard):
    for sample in _samples(photo_shard):
        pil = render_pil(sample, BOX, (48, 64), "bicubic").float()
        tensor = render_tensor(sample, BOX, (48, 64), "bicubic").float()
        assert pil.shape == tensor.shape == (2, 3, 48, 64)
        assert (pil - tensor).abs().mean() < 6, sample.key  # of 255: the box rounded to whole pixels
        torch.testing.assert_close(decode_tensor(sample).float(), torch.from_numpy(
            np.array(sample.rgb())).permute(2, 0, 1).float(), atol=40, rtol=0)  # libjpeg in both, maybe other IDCTs


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_the_stored_views_replay_with_the_store_renderer(photo_shard, tmp_path, renderer):
    manifest = extract([photo_shard], str(tmp_path / "s.zarr"), _cfg(views=ViewConfig(count=3, renderer=renderer)),
                       progress=False)
    assert manifest["views"]["renderer"] == renderer
    store, teacher = FeatureStore.open(str(tmp_path / "s.zarr")), create_teacher(TEACHER)
    data = store.read_shard("photos-000000")
    for row, sample in enumerate(_samples(photo_shard)):
        x = model_input(renderer, sample, data["views"][row], teacher.data_config)
        features = teacher(x)[0].numpy()
        stored = data["features"][row].astype(np.float32)
        cosine = (features * stored).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(stored, axis=1))
        assert cosine.min() >= 0.999, (renderer, sample.key, cosine)


def test_the_student_loader_renders_with_the_store_renderer(photo_shard, tmp_path):
    extract([photo_shard], str(tmp_path / "s.zarr"), _cfg(views=ViewConfig(count=2, renderer="tensor")), progress=False)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    dc = create_teacher(TEACHER).data_config
    loader = train_pipeline([photo_shard], store, dc, LoaderConfig(batch_size=1, shuffle_buffer=1), seed=0, epoch=0)
    samples = {s.key: s for s in _samples(photo_shard)}
    data = store.read_shard("photos-000000")
    rows = {k: i for i, k in enumerate(data["keys"].tolist())}
    for batch in loader:
        key, view = batch["key"][0], int(batch["view"][0])
        assert batch["image"].dtype == torch.uint8  # normalized where the student runs
        image = network_input(batch["image"], dc, RuntimeConfig(), torch.device("cpu"))
        expected = model_input("tensor", samples[key], data["views"][rows[key], view][None], dc)
        torch.testing.assert_close(image, expected)
        assert not torch.allclose(image, model_input("pil", samples[key], data["views"][rows[key], view][None], dc))


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_the_loader_replays_the_extractions_pixels_byte_for_byte(photo_shard, tmp_path, monkeypatch, renderer):
    """One renderer, one set of pixels: the uint8 views the teacher was given at extraction are those the student's
    loader makes (at the teacher's size and interpolation), whatever device either runs on."""
    given = {}
    render = RENDERERS[renderer]

    def recording(sample, views, *args, **kwargs):
        pixels = render(sample, views, *args, **kwargs)
        given[sample.key] = pixels.cpu().clone()
        return pixels

    monkeypatch.setitem(RENDERERS, renderer, recording)
    extract([photo_shard], str(tmp_path / "s.zarr"), _cfg(views=ViewConfig(count=3, renderer=renderer)), progress=False)
    monkeypatch.setitem(RENDERERS, renderer, render)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    dc = create_teacher(TEACHER).data_config
    seen = 0
    for epoch in range(3):
        cfg = LoaderConfig(batch_size=1, shuffle_buffer=1, eval_view=True, num_workers=0)
        loader = train_pipeline([photo_shard], store, dc, cfg, seed=0, epoch=epoch)
        for batch in loader:
            key, view = batch["key"][0], int(batch["view"][0])
            assert torch.equal(batch["image"][0], given[key][view]), (renderer, key, view)
            seen += 1
    assert seen == 3 * len(given) == 12


def test_a_store_naming_an_unknown_renderer_is_refused_in_one_line(photo_shard, tmp_path):
    extract([photo_shard], str(tmp_path / "s.zarr"), _cfg(), progress=False)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a")
    manifest = dict(root.attrs[MANIFEST_ATTR])
    root.attrs[MANIFEST_ATTR] = {**manifest, "views": {**manifest["views"], "renderer": "dali"}}
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    with pytest.raises(GenddError, match="unknown renderer 'dali' \\(known: pil, tensor\\)"):
        train_pipeline([photo_shard], store, {}, LoaderConfig(), seed=0, epoch=0)


def test_a_jpeg_that_decodes_only_in_its_header_is_skipped_by_either_renderer(photo_shard, tmp_path):
    good = [{"__key__": s.key, "jpg": s.data, "cls": s.label} for s in _samples(photo_shard)]
    cut = {"__key__": "cut", "jpg": good[0]["jpg"][: len(good[0]["jpg"]) // 3], "cls": 1}
    url = write_tar(tmp_path / "cut-000000.tar", [good[0], cut, good[1]])
    for renderer in RENDERERS:
        manifest = extract([url], str(tmp_path / f"{renderer}.zarr"), _cfg(views=ViewConfig(renderer=renderer),
                                                                         on_error="skip"), progress=False)
        assert manifest["shards"][0]["count"] == 2
        assert [s["key"] for s in manifest["skipped"]] == ["cut"] and "unreadable" in manifest["skipped"][0]["reason"]
        with pytest.raises(GenddError, match="cut-000000.tar: sample cut: unreadable"):
            extract([url], str(tmp_path / f"{renderer}-fail.zarr"), _cfg(views=ViewConfig(renderer=renderer)),
                    progress=False)


def _store(path) -> str:
    """An empty store (a root and its ``shards`` group, as `write_root` leaves them)."""
    open_root(str(path)).require_group("shards")
    return str(path)


def test_a_shard_written_in_pieces_equals_one_written_at_once(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"keys": np.array([f"k{i}" for i in range(11)]), "labels": np.arange(11),
              "features": rng.normal(size=(11, 2, 8)).astype(np.float16)}
    once = write_shard(_store(tmp_path / "a.zarr"), "s", arrays, {"count": 11}, chunk=4, clevel=5)
    from gendd_pipe.store.writer import ShardWriter

    writer = ShardWriter(_store(tmp_path / "b.zarr"), "s", schema_of(arrays), chunk=4, clevel=5)
    for start, stop in ((0, 1), (1, 6), (6, 11)):
        writer.append({k: v[start:stop] for k, v in arrays.items()})
    pieces = writer.commit({"count": 11})
    a, b = (zarr.open_group(str(tmp_path / f"{n}.zarr"))["shards/s"] for n in "ab")
    assert once == pieces and a.attrs.asdict() == b.attrs.asdict()
    for key in arrays:
        np.testing.assert_array_equal(a[key][...], b[key][...])
        np.testing.assert_array_equal(a[key][...], arrays[key])


def test_a_shard_writer_writes_nothing_outside_its_shard(tmp_path, monkeypatch):
    """So that a writer killed mid-shard leaves no zarr temporary file where the next writer would not replace it."""
    import zarr.storage._local as local

    store, written, atomic_write = _store(tmp_path / "a.zarr"), [], local._atomic_write
    monkeypatch.setattr(local, "_atomic_write", lambda path, *a, **k: written.append(path) or atomic_write(path, *a, **k))
    write_shard(store, "s", {"keys": np.array(["a", "b"]), "labels": np.arange(2)}, {"count": 2}, chunk=4, clevel=5)
    shard = tmp_path / "a.zarr" / "shards" / "s"
    assert written and [p for p in written if shard not in p.parents] == []


def test_int8_quantization_keeps_the_direction_of_every_view():
    features = np.maximum(np.random.default_rng(0).normal(size=(16, 3, 64)), 0).astype(np.float32)  # post-ReLU
    q, scales, cosine = quantize_int8(features)
    assert q.dtype == np.int8 and scales.shape == (64,) and cosine.shape == (16, 3)
    back = dequantize_int8(q, scales[None], rows_per_scale=16)
    assert np.abs(back - features).max() <= scales.max() / 2 + 1e-6
    assert cosine.min() > 0.999


def test_an_int8_store_records_its_round_trip_and_distills_from_dequantized_features(photo_shard, tmp_path):
    extract([photo_shard], str(tmp_path / "f16.zarr"), _cfg(), progress=False)
    manifest = extract([photo_shard], str(tmp_path / "i8.zarr"), _cfg(features_dtype="int8", chunk_size=3),
                       progress=False)  # two chunks of rows, so two rows of scales
    assert manifest["storage"]["features_dtype"] == "int8" and manifest["storage"]["int8_floor"] == 0.999
    assert 0.999 <= manifest["int8_cosine"]["min"] <= manifest["int8_cosine"]["mean"] <= 1.0
    assert manifest["shards"][0]["int8_cosine"] == manifest["int8_cosine"]
    f16, i8 = (FeatureStore.open(str(tmp_path / f"{n}.zarr")) for n in ("f16", "i8"))
    assert i8.shard("photos-000000")["features"].dtype == np.int8
    assert i8.shard("photos-000000")["feature_scales"].shape == (2, 512)
    a, b = f16.read_shard("photos-000000")["features"].astype(np.float32), i8.read_shard("photos-000000")["features"]
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() >= 0.999
    np.testing.assert_allclose(i8.view_features("photos-000000", 1), b[:, 1])
    np.testing.assert_allclose(i8.feature("photos-000000", 3, 2), b[3, 2])
    batch = next(iter(train_pipeline([photo_shard], i8, create_teacher(TEACHER).data_config,
                                     LoaderConfig(batch_size=2, shuffle_buffer=1), seed=0, epoch=0)))
    assert batch["feature"].dtype == torch.float32 and batch["feature"].shape == (2, 512) and "logits" not in batch


def test_an_int8_round_trip_under_its_floor_is_refused_and_loses_nothing(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"keys": np.array(["a", "b", "c"]), "features": rng.normal(size=(3, 2, 32)).astype(np.float32)}
    store = _store(tmp_path / "s.zarr")
    kept = write_shard(store, "s1", arrays, {"count": 3}, chunk=4, clevel=5, int8_floor=0.99)
    assert kept["int8_cosine"]["min"] >= 0.99
    with pytest.raises(GenddError, match=r"^shard s2: int8 features round-trip at cosine 0\.\d+ at worst, under the "
                                         r"floor 0\.9999999 \(--int8-floor\)"):
        write_shard(store, "s2", arrays, {"count": 3}, chunk=4, clevel=5, int8_floor=0.9999999)
    root = open_root(store)
    assert root["shards/s1"].attrs["complete"] and not root["shards/s2"].attrs.get("complete")


def test_the_cli_refuses_an_int8_store_under_its_floor_in_one_line(photo_shard, tmp_path):
    from tests.test_bad_inputs import invoke, one_line

    one_line(invoke("extract", photo_shard, "--out", tmp_path / "s.zarr", "--teacher", "resnet18", "--weights", "none",
                    "--input-size", "64", "--dask-workers", "0", "-q", "--features-dtype", "int8",
                    "--int8-floor", "0.9999999"),
             "error: shard photos-000000: int8 features round-trip at cosine", "keep --features-dtype float16")
    assert FeatureStore.open(str(tmp_path / "s.zarr")).shard_names == []


@cuda
@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_gpu_rendered_views_replay(photo_shard, tmp_path, renderer):
    manifest = extract([photo_shard], str(tmp_path / "g.zarr"),
                       _cfg(views=ViewConfig(count=3, renderer=renderer), runtime=_gpu()), progress=False)
    assert manifest["views"]["renderer"] == renderer
    store = FeatureStore.open(str(tmp_path / "g.zarr"))
    teacher = create_teacher(TEACHER, RuntimeConfig(device="cpu"))  # the reference: CPU fp32
    data = store.read_shard("photos-000000")
    for row, sample in enumerate(_samples(photo_shard)):
        features = teacher(model_input(renderer, sample, data["views"][row], teacher.data_config))[0].numpy()
        stored = data["features"][row].astype(np.float32)
        cosine = (features * stored).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(stored, axis=1))
        assert cosine.min() >= 0.999, (renderer, sample.key, cosine)


def _gpu():
    return RuntimeConfig(device="cuda", amp="bf16")
