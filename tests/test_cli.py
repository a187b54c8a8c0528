import json

import pytest
from typer.testing import CliRunner

from gendd_pipe import FeatureStore
from gendd_pipe.cli import app
from tests.conftest import write_tar

runner = CliRunner()
TINY = ["--teacher", "resnet18", "--weights", "none", "--input-size", "32", "--views", "2", "-q"]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_prepare_extract_info_verify(tmp_path, digit_shards):
    store = tmp_path / "store.zarr"
    pattern = digit_shards[0].replace("train-000000", "train-{000000..000002}")
    result = _invoke("extract", pattern, "--out", store, *TINY, "--dask-workers", "1", "--logits", "topk:3")
    assert result.exit_code == 0, result.output
    assert "3 shards, 120 samples, 0 skipped" in result.output
    result = _invoke("info", store, "--json")
    summary = json.loads(result.output)
    assert summary["samples"] == 120 and summary["shards"] == 3 and summary["compression_ratio"] > 1
    assert "compression vs raw fp32" in _invoke("info", store).output
    result = _invoke("verify", store, "--recompute", "5")
    assert result.exit_code == 0, result.output
    assert "5 samples recomputed" in result.output and "ok" in result.output


def test_prepare_folder(tmp_path, photos):
    from PIL import Image

    for i, (name, image) in enumerate(photos.items()):
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "src" / f"c{i % 2}" / f"{name}.jpg")
    result = _invoke("prepare", "--dataset", tmp_path / "src", "--out", tmp_path / "shards", "--val-fraction", 0.5)
    assert result.exit_code == 0, result.output
    assert "2 train samples" in result.output and (tmp_path / "shards" / "val-000000.tar").exists()


def test_verify_finds_a_damaged_shard(tmp_path, digit_shards):
    store = tmp_path / "s.zarr"
    assert _invoke("extract", digit_shards[0], "--out", store, *TINY, "--dask-workers", "0").exit_code == 0
    import zarr

    zarr.open_group(str(store / "shards" / "train-000000"), mode="a").attrs["count"] = 41
    result = _invoke("verify", store)
    assert result.exit_code == 1 and "keys has 40 rows, count says 41" in result.output


def test_bad_inputs_are_one_line_errors(tmp_path, digit_shards, photos):
    out = ["--out", tmp_path / "s.zarr"]
    _one_line_error(_invoke("extract", tmp_path / "missing-*.tar", *out, *TINY), "missing-*.tar", "no shard matches")
    _one_line_error(_invoke("extract", digit_shards[0], *out, "--teacher", "nonet", "--weights", "none"),
                    "unknown teacher model 'nonet'")
    _one_line_error(_invoke("extract", digit_shards[0], *out, *TINY, "--logits", "top5"),
                    "extract.logits: must be auto, derived, full or topk:K with K >= 1, got 'top5' (option --logits)")
    broken = write_tar(tmp_path / "broken-000000.tar", [{"__key__": "x1", "png": b"garbage", "cls": 0}])
    _one_line_error(_invoke("extract", broken, *out, *TINY, "--dask-workers", "0"), "broken-000000.tar", "sample x1")
    _one_line_error(_invoke("info", tmp_path / "nowhere.zarr"), "nowhere.zarr")
    _one_line_error(_invoke("prepare", "--dataset", tmp_path / "nodir", "--out", tmp_path / "o"),
                    "nodir: not a directory")
    assert _invoke("extract", digit_shards[0], *out, *TINY, "--dask-workers", "0").exit_code == 0
    _one_line_error(_invoke("extract", digit_shards[0], *out, *TINY[:-3], "--hflip", "0.0", "--dask-workers", "0"),
                    "s.zarr", "another views")
    assert FeatureStore.open(str(tmp_path / "s.zarr")).num_samples == 40
