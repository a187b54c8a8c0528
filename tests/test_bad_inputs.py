"""Bad input, as a hostile or careless user gives it: every kind ends in one of three outcomes, each asserted.

- a one-line error (exit 1, no traceback) that names the option, file, shard or key;
- a recorded skip (the manifest names the key and why) with every other sample kept;
- a correct conversion (the stored features equal those of the well-formed equivalent).

Hostile pickles touch a marker file if they ever run; every test asserts the marker never appears.
docs/bad-input.md lists these kinds and their outcomes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from gendd_pipe import FeatureStore
from gendd_pipe.cli import app
from tests.conftest import write_tar

runner = CliRunner()
TEACHER = ["--teacher", "resnet18", "--weights", "none", "--input-size", "32"]
TINY = [*TEACHER, "--views", "2", "--dask-workers", "0", "-q"]
GENDD = ["--set", "distill.common.gendd.head={width: 64, depth: 1, diffusion_batch_mul: 2}",
         "--set", "distill.common.gendd.predict.sampling_steps=4"]


class Hostile:
    """Unpickling this touches ``path``: proof that a loader ran code from a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PICKLE-RAN"
    yield path
    assert not path.exists(), "a hostile pickle ran"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, *fragments) -> str:
    """Assert a one-line ``error:`` with exit 1 and no traceback; returns the line."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits(mnist_records):
    """Eight real digits: (key, 8-bit gray array, label)."""
    return [(f"d{i}", np.asarray(Image.open(io.BytesIO(r.load()))), r.label) for i, r in enumerate(mnist_records[:8])]


def good(digits, n=4):
    return [{"__key__": k, "png": png(a), "cls": y} for k, a, y in digits[:n]]


def extract(tmp_path, shards, *args, out="s.zarr"):
    return invoke("extract", *shards, "--out", tmp_path / out, *TINY, *args)


def extract_skip(tmp_path, samples, name="bad-000000"):
    """Extract one shard under --on-error skip; returns (kept keys, skip records)."""
    shard = write_tar(tmp_path / f"{name}.tar", samples)
    result = extract(tmp_path, [shard], "--on-error", "skip", out=f"{name}.zarr")
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(str(tmp_path / f"{name}.zarr"))
    return store.read_shard(name)["keys"].tolist(), store.manifest["skipped"]


def skipped_and_failed(tmp_path, samples, key, reason):
    """The sample ``key`` is skipped (recorded with ``reason``) under skip, and is a one-line error under fail."""
    kept, skipped = extract_skip(tmp_path, samples)
    assert key not in kept and [s["key"] for s in skipped] == [key] and reason in skipped[0]["reason"]
    assert len(kept) == len({s["__key__"] for s in samples}) - 1
    one_line(extract(tmp_path, [str(tmp_path / "bad-000000.tar")], out="f.zarr"), "bad-000000.tar",
             f"sample {key}", reason)


def features_of(tmp_path, samples, name):
    shard = write_tar(tmp_path / f"{name}.tar", samples)
    assert extract(tmp_path, [shard], out=f"{name}.zarr").exit_code == 0
    return FeatureStore.open(str(tmp_path / f"{name}.zarr")).read_shard(name)


# --- image bytes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,data", [
    ("random bytes", os.urandom(300)),
    ("truncated png", None),
    ("zero bytes", b""),
])
def test_unreadable_image_is_skipped_or_one_line(tmp_path, digits, kind, data):
    samples = good(digits)
    samples[1]["png"] = samples[1]["png"][:60] if data is None else data
    skipped_and_failed(tmp_path, samples, "d1", "unreadable png image")


def test_a_bad_image_on_a_dask_worker_is_the_one_line_alone(tmp_path, digits):
    """The shard's failure comes back as the task's result: no worker logs "Compute Failed" with a traceback."""
    samples = good(digits)
    samples[1]["png"] = b"not an image"
    shard = write_tar(tmp_path / "bad-000000.tar", samples)
    command = [sys.executable, "-m", "gendd_pipe.cli", "extract", shard, "--out", str(tmp_path / "s.zarr"), *TEACHER,
               "--views", "2", "--dask-workers", "1", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error:") and "bad-000000.tar: sample d1: unreadable png image" in lines[0]


def test_float_image_is_skipped_not_clipped(tmp_path, digits):
    samples, buf = good(digits), io.BytesIO()
    Image.fromarray(digits[2][1].astype(np.float32) / 255).save(buf, format="TIFF")
    samples[2] = {"__key__": "d2", "tif": buf.getvalue(), "cls": 1}
    skipped_and_failed(tmp_path, samples, "d2", "float image")


def test_decompression_bomb_is_skipped(tmp_path, digits):
    samples, buf = good(digits), io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 Mpx, a few KB on disk
    samples[0]["png"] = buf.getvalue()
    skipped_and_failed(tmp_path, samples, "d0", "decompression bomb")


def test_sample_without_an_image_is_skipped(tmp_path, digits):
    samples = good(digits)
    del samples[3]["png"]
    skipped_and_failed(tmp_path, samples, "d3", "no image")


def test_16_bit_png_is_scaled_to_8_bits(tmp_path, digits):
    eight = good(digits)
    sixteen = [{**s, "png": png(a.astype(np.uint16) * 257)} for s, (_, a, _) in zip(eight, digits)]
    assert Image.open(io.BytesIO(sixteen[0]["png"])).mode == "I;16"
    a, b = features_of(tmp_path, eight, "eight"), features_of(tmp_path, sixteen, "sixteen")
    np.testing.assert_array_equal(a["features"], b["features"])


@pytest.mark.parametrize("kind", ["jpeg bytes named png", "cmyk jpeg", "rgba png", "palette png"])
def test_other_encodings_decode_as_rgb(tmp_path, digits, kind):
    """Stored features equal those of the same pixels given as a plain RGB PNG."""
    rgb = [np.stack([a, a[::-1], 255 - a], -1) for _, a, _ in digits[:4]]
    encoded = []
    for array in rgb:
        image, buf = Image.fromarray(array), io.BytesIO()
        if kind == "cmyk jpeg":
            image = image.convert("CMYK")
            image.save(buf, format="JPEG", quality=95)
        elif kind == "jpeg bytes named png":
            image.save(buf, format="JPEG", quality=95)
        elif kind == "rgba png":
            image.putalpha(128)
            image.save(buf, format="PNG")
        else:
            image.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    reference = [np.asarray(Image.open(io.BytesIO(e)).convert("RGB")) for e in encoded]  # what timm's loader sees
    plain = features_of(tmp_path, [{"__key__": f"k{i}", "png": png(r), "cls": 0} for i, r in enumerate(reference)],
                        "plain")
    other = features_of(tmp_path, [{"__key__": f"k{i}", "png": e, "cls": 0} for i, e in enumerate(encoded)], "other")
    np.testing.assert_array_equal(plain["features"], other["features"])


def test_one_pixel_image_is_kept(tmp_path, digits):
    samples = good(digits)
    samples[0]["png"] = png(np.full((1, 1), 200, np.uint8))
    kept, skipped = extract_skip(tmp_path, samples)
    assert kept == ["d0", "d1", "d2", "d3"] and skipped == []


# --- tar structure -------------------------------------------------------------------------------------------

def _member_ends(path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        ends: dict[str, int] = {}
        for m in tar.getmembers():
            ends[m.name.split(".")[0]] = max(ends.get(m.name.split(".")[0], 0), m.offset_data + m.size)
    return ends


@pytest.mark.parametrize("where", ["inside a member", "inside a header"])
def test_cut_tar_keeps_every_complete_sample(tmp_path, digits, where):
    full = write_tar(tmp_path / "full.tar", good(digits, 8))
    data, ends = Path(full).read_bytes(), _member_ends(full)
    cut = sorted(ends.values())[5] + (700 if where == "inside a member" else 100)  # after sample 5's last member
    Path(full).unlink()
    whole = [k for k, end in ends.items() if end <= cut]
    (tmp_path / "bad-000000.tar").write_bytes(data[:cut])
    result = extract(tmp_path, [tmp_path / "bad-000000.tar"], "--on-error", "skip")
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert store.read_shard("bad-000000")["keys"].tolist() == whole == ["d0", "d1", "d2", "d3", "d4", "d5"]
    record = store.manifest["skipped"][-1]
    assert record["shard"] == "bad-000000" and record["after"] == "d5" and ends["d5"] <= record["offset"] <= cut + 512
    one_line(extract(tmp_path, [tmp_path / "bad-000000.tar"], out="f.zarr"), "bad-000000.tar", "tar breaks at byte",
             "after sample 'd5'")


@pytest.mark.parametrize("kind,data", [("not a tar", None), ("empty file", b"")])
def test_a_file_that_is_no_tar_is_one_line_or_an_empty_recorded_shard(tmp_path, kind, data):
    (tmp_path / "bad-000000.tar").write_bytes(os.urandom(4096) if data is None else data)
    one_line(extract(tmp_path, [tmp_path / "bad-000000.tar"], out="f.zarr"), "bad-000000.tar", "tar breaks at byte 0")
    assert extract(tmp_path, [tmp_path / "bad-000000.tar"], "--on-error", "skip").exit_code == 0
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert store.num_samples == 0 and store.manifest["skipped"][0]["offset"] == 0


def test_a_member_twice_in_a_row_skips_that_sample(tmp_path, digits):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, array, label in digits[:3]:
            members = [(f"{key}.cls", str(label).encode()), (f"{key}.png", png(array))]
            if key == "d1":
                members.append((f"{key}.png", png(array)))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = extract(tmp_path, [shard], "--on-error", "skip")
    assert result.exit_code == 0
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert store.read_shard("bad-000000")["keys"].tolist() == ["d0", "d2"]
    assert [(s["key"], s["reason"]) for s in store.manifest["skipped"]] == [("d1", "member d1.png appears twice")]
    one_line(extract(tmp_path, [shard], out="f.zarr"), "bad-000000.tar", "sample d1: member d1.png appears twice")


def test_duplicate_keys_far_apart_keep_the_first(tmp_path, digits):
    samples = good(digits, 6)
    samples.insert(5, {**samples[1], "png": png(digits[7][1])})  # d1 again, four samples later
    kept, skipped = extract_skip(tmp_path, samples)
    assert kept == ["d0", "d1", "d2", "d3", "d4", "d5"]
    assert [s["key"] for s in skipped] == ["d1"] and "duplicate key" in skipped[0]["reason"]
    one_line(extract(tmp_path, [str(tmp_path / "bad-000000.tar")], out="f.zarr"), "sample d1: duplicate key")


def test_member_names_are_keys_never_paths(tmp_path, digits):
    work = tmp_path / "work"
    work.mkdir()
    samples = [{"__key__": "../../escaped", "png": png(digits[0][1]), "cls": 1},
               {"__key__": "/tmp/absolute-gendd-key", "png": png(digits[1][1]), "cls": 2},
               {"__key__": "dir/nested", "png": png(digits[2][1]), "cls": 3}]
    kept, skipped = extract_skip(work, samples)
    assert kept == ["../../escaped", "/tmp/absolute-gendd-key", "dir/nested"] and skipped == []
    assert not (tmp_path / "escaped.png").exists() and not os.path.exists("/tmp/absolute-gendd-key.png")
    assert sorted(os.listdir(work)) == ["bad-000000.tar", "bad-000000.zarr"]


def test_directories_links_and_metadata_members_are_ignored(tmp_path, digits):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, kind in (("somedir", tarfile.DIRTYPE), ("link.png", tarfile.SYMTYPE), ("__meta__", tarfile.REGTYPE),
                           ("README", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        for key, array, label in digits[:2]:
            for name, data in ((f"{key}.cls", str(label).encode()), (f"{key}.png", png(array))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert extract(tmp_path, [shard]).exit_code == 0
    assert FeatureStore.open(str(tmp_path / "s.zarr")).read_shard("bad-000000")["keys"].tolist() == ["d0", "d1"]


def test_gzipped_tar_reads_like_the_plain_one(tmp_path, digits):
    plain = write_tar(tmp_path / "plain.tar", good(digits))
    (tmp_path / "zipped.tar").write_bytes(gzip.compress(Path(plain).read_bytes()))
    assert extract(tmp_path, [plain, tmp_path / "zipped.tar"]).exit_code == 0
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    np.testing.assert_array_equal(store.read_shard("plain")["features"], store.read_shard("zipped")["features"])


def test_shard_patterns_that_match_nothing_or_collide(tmp_path, digits):
    one_line(extract(tmp_path, [tmp_path / "none-*.tar"]), "none-*.tar", "no shard matches")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_tar(tmp_path / folder / "x.tar", good(digits))
    one_line(extract(tmp_path, [tmp_path / "a" / "x.tar", tmp_path / "b" / "x.tar"]),
             "two input shards are both named 'x'")


# --- labels --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label,reason", [(1000, "label 1000 is outside the classes (0..999"),
                                          (-2, "label -2 is outside the classes"),
                                          ("seven", "cls is not an integer")])
def test_bad_labels_are_skipped_or_one_line(tmp_path, digits, label, reason):
    samples = good(digits)
    samples[2]["cls"] = label
    skipped_and_failed(tmp_path, samples, "d2", reason)


def test_label_minus_one_means_unlabeled(tmp_path, digits):
    samples = good(digits)
    samples[0]["cls"] = -1
    kept, skipped = extract_skip(tmp_path, samples)
    store = FeatureStore.open(str(tmp_path / "bad-000000.zarr"))
    assert skipped == [] and store.read_shard("bad-000000")["labels"].tolist()[0] == -1


# --- options and params --------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value,message", [
    ("--views", "0", "extract.views.count: must be > 0, got 0 (option --views)"),
    ("--input-size", "0", "extract.teacher.input_size: must be > 0, got 0 (option --input-size)"),
    ("--batch-size", "0", "extract.batch_size: must be > 0, got 0 (option --batch-size)"),
    ("--chunk-size", "0", "extract.chunk_size: must be > 0, got 0 (option --chunk-size)"),
    ("--set", "extract.clevel=10", "extract.clevel: must be <= 9, got 10"),
    ("--logits", "topk:0", "extract.logits: must be auto, derived, full or topk:K"),
    ("--on-error", "ignore", "extract.on_error: must be one of 'fail' or 'skip'"),
    ("--dask-workers", "-1", "extract.dask_workers: must be >= 0"),
])
def test_extract_options_out_of_range(tmp_path, digit_store, option, value, message):
    one_line(extract(tmp_path, digit_store["train"][:1], option, value), message)
    assert not (tmp_path / "s.zarr").exists()


def test_out_that_is_a_file_or_below_one(tmp_path, digit_store):
    (tmp_path / "file").write_text("keep me")
    for out in ("file", "file/below"):
        one_line(extract(tmp_path, digit_store["train"][:1], out=out), "extract.out:", "regular file")
        one_line(distill(digit_store, tmp_path / out), "distill.out:", "regular file")
        one_line(invoke("evaluate", "--checkpoint", tmp_path / "x.safetensors", "--val-shards", digit_store["val"][0],
                        "--out", tmp_path / out), "evaluate.out:", "regular file")
    assert (tmp_path / "file").read_text() == "keep me"


def distill(digit_store, out, *extra):
    args = ["distill", "--store", digit_store["store"], "--out", out, "--student", "resnet10t", "--input-size", "32",
            "--method", "gendd", "--batch-size", "16", "--warmup-epochs", "0", "--epochs", "1", "-q", *GENDD,
            "--val-shards", digit_store["val"][0]]
    for shard in digit_store["train"]:
        args += ["--shards", shard]
    return invoke(*args, *extra)


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "distill.runs.gendd.loader.batch_size: must be > 0, got 0 (option --batch-size)"),
    (["--epochs", "0"], "must be > 0, got 0 (option --epochs)"),
    (["--lr", "-1"], "must be > 0, got -1.0 (option --lr)"),
    (["--set", "distill.common.gendd.predict.sampling_steps=0"], "distill.common.gendd.predict.sampling_steps: must be > 0"),
    (["--set", "distill.common.gendd.predict.samples=0"], "distill.common.gendd.predict.samples: must be > 0"),
    (["--set", "distill.common.gendd.predict.sampling_steps=5000"], "sampling_steps 5000 exceeds head.train_steps 1000"),
    (["--set", "distill.common.gendd.head.width=-3"], "distill.common.gendd.head.width: must be > 0"),
    (["--set", "distill.common.epoch=3"], "distill.common.epoch: unknown key (did you mean 'epochs'?"),
    (["--set", "distill.common.seed=many"], "distill.common.seed: must be an integer"),
    (["--set", "distill.common.gendd.stage1_epochs=1"], "gendd.stage1_epochs 1 leaves none of the 1 epochs to the "
                                                        "diffusion head"),
    (["--epochs", "3", "--unsupervised", "--set", "distill.common.gendd.stage1_epochs=1"],
     "gendd.stage1_epochs trains on labels; set it to 0 for an unsupervised run"),
    (["--set", "distill.common.student.eval.resize=24"], "distill.runs.gendd.student: eval.resize 24 is smaller than the 32 "
                                                         "px center crop (input_size)"),
    (["--set", "distill.common.schedule=step"], "schedule step needs decay_epochs"),
    (["--set", "distill.common.decay_epochs=[9, 3]"], "decay_epochs must rise, got [9, 3]"),
    (["--run", "../escape"], "--run '../escape': a run name is letters, digits, _ . -"),
    (["--set", "distill.runs={../escape: {method: kd}}"], "distill.runs.../escape: a run name is letters, digits, _ . - (it names a directory), got '../escape'"),
])
def test_distill_options_are_refused_before_any_training(tmp_path, digit_store, extra, message):
    one_line(distill(digit_store, tmp_path / "d", *extra), message)
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def trained(digit_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "d"
    result = distill(digit_store, out)
    assert result.exit_code == 0, result.output
    return out / "runs" / "gendd" / "last.safetensors"


def evaluate(digit_store, checkpoint, *extra):
    return invoke("evaluate", "--checkpoint", checkpoint, "--val-shards", digit_store["val"][0], "-q", *extra)


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "evaluate.batch_size: must be > 0, got 0 (option --batch-size)"),
    (["--input-size", "0"], "evaluate.input_size: must be > 0, got 0 (option --input-size)"),
    (["--set", "evaluate.predict.gendd.sampling_steps=0"], "evaluate.predict.gendd.sampling_steps: must be > 0"),
    (["--set", "evaluate.predict.gendd.samples=0"], "evaluate.predict.gendd.samples: must be > 0"),
    (["--set", "evaluate.predict.gendd.sampling_steps=5000"], "sampling_steps 5000 exceeds head.train_steps"),
])
def test_evaluate_options_out_of_range(digit_store, trained, extra, message):
    one_line(evaluate(digit_store, trained, *extra), message)


# --- checkpoints and weights ---------------------------------------------------------------------------------

def test_earlier_pickled_checkpoints_still_evaluate(digit_store, trained, tmp_path):
    from gendd_pipe.distill.checkpoint import read_checkpoint

    legacy = tmp_path / "runs" / "gendd" / "last.pt"
    legacy.parent.mkdir(parents=True)
    torch.save({"format": "gendd-pipe/student-1", **read_checkpoint(str(trained))}, legacy)
    new, old = evaluate(digit_store, trained), evaluate(digit_store, legacy)
    assert new.exit_code == old.exit_code == 0, old.output
    assert json.loads(new.output)["student"] == json.loads(old.output)["student"]


@pytest.mark.parametrize("kind", ["torch.save", "pickle.dump", "safetensors name"])
def test_hostile_checkpoint_is_refused_unrun(digit_store, tmp_path, marker, kind):
    path = tmp_path / ("last.safetensors" if kind == "safetensors name" else "evil.pt")
    payload = {"format": "gendd-pipe/student-1", "epoch": Hostile(marker)}
    if kind == "pickle.dump":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    one_line(evaluate(digit_store, path), str(path), "not a gendd-pipe/student-1 checkpoint; refused to load it")


def test_hostile_last_checkpoint_is_refused_on_resume(digit_store, tmp_path, marker):
    run = tmp_path / "d" / "runs" / "gendd"
    run.mkdir(parents=True)
    torch.save({"format": "gendd-pipe/student-1", "config": Hostile(marker)}, run / "last.pt")
    one_line(distill(digit_store, tmp_path / "d", "--resume"), "last.pt", "refused to load it")


@pytest.mark.parametrize("kind,message", [("garbage", "not a gendd-pipe/student-1 checkpoint"),
                                          ("teacher weights", "not a gendd-pipe/student-1 checkpoint"),
                                          ("missing", "no such checkpoint")])
def test_foreign_checkpoints_are_one_line(digit_store, tmp_path, kind, message):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    if kind == "garbage":
        path.write_bytes(os.urandom(1000))
    elif kind == "teacher weights":
        save_file({"fc.weight": torch.zeros(2, 2)}, path)
    one_line(evaluate(digit_store, path), str(path), message)


@pytest.mark.parametrize("kind", ["hostile pickle", "garbage", "another architecture"])
def test_bad_teacher_weights_are_one_line(tmp_path, digit_store, marker, kind):
    path = tmp_path / "weights.pth"
    if kind == "hostile pickle":
        torch.save({"conv1.weight": Hostile(marker)}, path)
    elif kind == "garbage":
        path.write_bytes(os.urandom(2000))
    else:
        torch.save({"features.0.weight": torch.zeros(3, 3)}, path)
    result = invoke("extract", digit_store["train"][0], "--out", tmp_path / "s.zarr", "--teacher", "resnet18",
                    "--weights", path, "--input-size", "32", "--dask-workers", "0", "-q")
    one_line(result, "weights.pth", "cannot read weights" if kind != "another architecture" else "do not fit resnet18")


# --- stores --------------------------------------------------------------------------------------------------

@pytest.fixture
def copy_store(digit_store, tmp_path):
    path = tmp_path / "store.zarr"
    shutil.copytree(digit_store["store"], path)
    return path


def _first_chunk(store: Path, array: str) -> Path:
    return sorted(p for p in (store / "shards" / "train-000000" / array).rglob("*") if p.is_file()
                  and p.name != "zarr.json")[0]


def damage(store: Path, kind: str) -> str:
    """Damage shard train-000000 in one way; returns the problem verify must report."""
    if kind == "flipped byte":
        chunk = _first_chunk(store, "features")
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
        return "array features does not match its checksum"
    if kind == "lost chunk":
        _first_chunk(store, "features").unlink()  # zarr reads a lost chunk as fill values
        return "array features does not match its checksum"
    if kind == "missing array":
        shutil.rmtree(store / "shards" / "train-000000" / "views")
        return "array views is missing"
    if kind == "short array":
        group = zarr.open_group(str(store / "shards" / "train-000000"), mode="r+")
        group["labels"].resize((40,))
        return "labels has 40 rows, count says 48"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["flipped byte", "lost chunk", "missing array", "short array"])
def test_damaged_store_is_reported_not_trusted(digit_store, copy_store, tmp_path, kind):
    problem = damage(copy_store, kind)
    result = invoke("verify", copy_store)
    assert result.exit_code == 1 and f"shard train-000000: {problem}" in result.output, result.output
    args = ["distill", "--store", copy_store, "--shards", digit_store["train"][0], "--val-shards", digit_store["val"][0],
            "--out", tmp_path / "d", "--method", "kd", "--student", "resnet10t", "--input-size", "32", "--epochs", "1",
            "--batch-size", "16", "-q"]
    one_line(invoke(*args), "store.zarr: shard train-000000:", problem)


def test_half_written_shard_is_invisible(digit_store, copy_store, tmp_path):
    group = zarr.open_group(str(copy_store / "shards" / "train-000001"), mode="r+")
    group.attrs["complete"] = False  # as a writer killed before its commit leaves it
    assert FeatureStore.open(str(copy_store)).shard_names == ["train-000000", "val-000000"]
    result = invoke("verify", copy_store)
    assert result.exit_code == 1 and "shard train-000001: listed in the manifest but missing or incomplete" in result.output
    args = ["distill", "--store", copy_store, "--val-shards", digit_store["val"][0], "--out", tmp_path / "d",
            "--method", "kd", "--epochs", "1", "-q", "--shards", digit_store["train"][1]]
    one_line(invoke(*args), "train-000001.tar", "has no complete feature shard 'train-000001'")


def test_store_of_another_teacher_or_version_or_none(digit_store, copy_store, tmp_path):
    before = (copy_store / "zarr.json").read_bytes()
    one_line(invoke("extract", digit_store["train"][0], "--out", copy_store, "--teacher", "resnet34", "--weights", "none",
                    "--input-size", "32", "--views", "3", "--dask-workers", "0", "-q"), "written with another teacher")
    assert (copy_store / "zarr.json").read_bytes() == before
    root = zarr.open_group(str(copy_store), mode="r+")
    root.attrs["gendd_pipe"] = {**root.attrs["gendd_pipe"], "format_version": 99}
    one_line(invoke("info", copy_store), "format version 99 is not one this version of gendd-pipe reads (1, 2, 3, 4)")
    (tmp_path / "plain").mkdir()
    one_line(invoke("info", tmp_path / "plain"), "no feature store here")


# --- credentials ---------------------------------------------------------------------------------------------

@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server over ``tmp_path`` (it ignores credentials, as a presigned-URL host checks them)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the server's own access log is not the product's output
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_credentials_in_urls_reach_no_record_and_no_log(tmp_path, digits, http_server):
    write_tar(tmp_path / "cred-000000.tar", good(digits))
    url = f"http://reader:s3cr3t@{http_server}/cred-000000.tar?X-Amz-Signature=t0ken&part=1"
    result = invoke("extract", url, "--out", tmp_path / "s.zarr", *TINY[:-1], "-v")
    assert result.exit_code == 0, result.output
    written = [p.read_text() for p in (tmp_path / "s.zarr").rglob("*.json")] + [(tmp_path / "s.zarr" / "config.yaml")
                                                                              .read_text()]
    for text in [result.output, *written]:
        assert "s3cr3t" not in text and "t0ken" not in text
    shards = FeatureStore.open(str(tmp_path / "s.zarr")).manifest["shards"]
    assert shards[0]["source"] == f"http://{http_server}/cred-000000.tar?X-Amz-Signature=REDACTED&part=1"


def test_an_image_shard_changed_after_extraction_is_one_line(digit_store, tmp_path):
    """Same keys and labels, other pixels in one image: the student would see what the teacher never saw."""
    import webdataset as wds

    samples = [{"__key__": s["__key__"], "png": s["png"], "cls": s["cls"].decode()}
               for s in wds.WebDataset(digit_store["train"][0], shardshuffle=False)]
    samples[0]["png"] = png(255 - np.asarray(Image.open(io.BytesIO(samples[0]["png"]))))
    changed = write_tar(tmp_path / "train-000000.tar", samples)
    args = ["distill", "--store", digit_store["store"], "--shards", changed, "--val-shards", digit_store["val"][0],
            "--out", tmp_path / "d", "--method", "kd", "--student", "resnet10t", "--input-size", "32", "--epochs", "1",
            "--batch-size", "16", "-q"]
    one_line(invoke(*args), "train-000000.tar: not the bytes the store was extracted from")


def test_a_shard_url_that_is_refused_or_missing_is_one_line(tmp_path, http_server):
    one_line(extract(tmp_path, [f"http://{http_server}/no-such-000000.tar"]), "no-such-000000.tar: cannot open shard")
    one_line(extract(tmp_path, ["nosuchproto://bucket/x-000000.tar"]), "x-000000.tar: no fsspec filesystem handles nosuchproto://")
