"""Stores and shards in a bucket: a real S3-protocol server (moto's standalone server) on loopback.

The server enforces IAM: a ``writer`` user may do anything to S3, a ``reader`` user may only list and get,
and keys it does not know are refused. Endpoint and keys reach gendd-pipe only through the standard AWS
environment, never through its config, and the tests check that no object, output file or log line holds
them afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
from typer.testing import CliRunner

from gendd_pipe.cli import app
from gendd_pipe.data.prepare import write_shards
from gendd_pipe.extract import extract
from tests.test_faults import CONFIG, ARGS

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET, SHARDS, PER_SHARD = "team-cache", 4, 24
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _iam_user(iam, name: str, actions: list[str]) -> tuple[str, str]:
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def server():
    """moto's server on 127.0.0.1 and a free port, a writer and a reader user, then IAM enforced."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto's server did not start")
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        writer = _iam_user(iam, "writer", ["s3:*"])
        # read-only: the IAM actions S3 checks for reads, and the operation names moto 5.2.6 checks instead
        reader = _iam_user(iam, "reader", ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation",
                                           "s3:HeadObject", "s3:HeadBucket", "s3:ListObjectsV2"])
        enforce = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(enforce, timeout=10)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=writer[0],
                     aws_secret_access_key=writer[1]).create_bucket(Bucket=BUCKET)
        yield SimpleNamespace(endpoint=endpoint, writer=writer, reader=reader)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _as(server, monkeypatch, user: tuple[str, str], endpoint: str | None = None) -> None:
    """The standard AWS environment of ``user``, in this process and the processes it starts."""
    import s3fs

    for name, value in {"AWS_ENDPOINT_URL": endpoint or server.endpoint, "AWS_ACCESS_KEY_ID": user[0],
                        "AWS_SECRET_ACCESS_KEY": user[1], "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FSSPEC_S3", "{}")  # (restored to unset afterwards, as configure() sets it)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def writer(server, monkeypatch):
    _as(server, monkeypatch, server.writer)
    return fsspec.filesystem("s3")


@pytest.fixture(scope="module")
def bucket(server, tmp_path_factory, mnist_records):
    """Four shards of 24 digits uploaded to the bucket, and the store an in-process extraction makes of those
    URLs on a local disk."""
    import s3fs

    root = tmp_path_factory.mktemp("s3")
    local = write_shards(mnist_records[: SHARDS * PER_SHARD], str(root / "shards"), "train", PER_SHARD)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _as(server, monkeypatch, server.writer)
        fs = s3fs.S3FileSystem()
        for path in local:
            fs.put_file(path, f"{BUCKET}/shards/{Path(path).name}")
        pattern = f"s3://{BUCKET}/shards/train-*.tar"
        extract([pattern], str(root / "reference.zarr"), CONFIG, progress=False)
    return {"pattern": pattern, "reference": root / "reference.zarr", "local": local}


def _objects(fs, prefix: str) -> dict[str, bytes]:
    """Every object under a store's prefix but its config.yaml (it names the --out) and its leases."""
    found = {p[len(prefix) + 1:]: fs.cat_file(p) for p in fs.find(prefix)}
    return {k: v for k, v in found.items() if k != "config.yaml" and not k.startswith("leases/")}


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


def _extract(store: str, pattern: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gendd_pipe.cli", "extract", pattern, "--out", store, *ARGS, "--dask-workers", "0",
            *extra]


def _complete(fs, prefix: str) -> int:
    fs.invalidate_cache()
    try:
        return sum(b'"complete": true' in fs.cat_file(p) for p in fs.glob(f"{prefix}/shards/*/zarr.json"))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_store_in_a_bucket_is_the_local_store_resumes_after_sigkill_and_serves_every_reader(
        server, bucket, writer, tmp_path):
    fs, logs = writer, []
    # extract into the bucket from the bucket; the objects are the local store's files, byte for byte
    done = subprocess.run(_extract(f"s3://{BUCKET}/a.zarr", bucket["pattern"]), capture_output=True, text=True,
                          timeout=600)
    logs.append(done.stdout + done.stderr)
    assert done.returncode == 0, logs[-1]
    fs.invalidate_cache()
    a = _objects(fs, f"{BUCKET}/a.zarr")
    assert a == _files(bucket["reference"])

    # SIGKILL mid-run, resume: the objects end identical to the uninterrupted run's
    proc = subprocess.Popen(_extract(f"s3://{BUCKET}/b.zarr", bucket["pattern"]), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _complete(fs, f"{BUCKET}/b.zarr") < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = _complete(fs, f"{BUCKET}/b.zarr")
    assert proc.returncode == -signal.SIGKILL and 1 <= killed_at < SHARDS, (proc.returncode, killed_at)
    done = subprocess.run(_extract(f"s3://{BUCKET}/b.zarr", bucket["pattern"]), capture_output=True, text=True,
                          timeout=600)
    logs.append(done.stdout + done.stderr)
    assert done.returncode == 0, logs[-1]
    fs.invalidate_cache()
    assert _objects(fs, f"{BUCKET}/b.zarr") == a

    # every reader, straight from the bucket
    info = runner.invoke(app, ["info", f"s3://{BUCKET}/a.zarr", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["samples"] == SHARDS * PER_SHARD
    checked = runner.invoke(app, ["verify", f"s3://{BUCKET}/a.zarr", "--recompute", "4"])
    assert checked.exit_code == 0 and "4 samples recomputed" in checked.output and ", ok" in checked.output, checked.output
    shards = [a for u in range(SHARDS - 1) for a in ("--shards", f"s3://{BUCKET}/shards/train-{u:06d}.tar")]
    val = f"s3://{BUCKET}/shards/train-{SHARDS - 1:06d}.tar"
    trained = runner.invoke(app, ["distill", "--store", f"s3://{BUCKET}/a.zarr", *shards, "--val-shards", val,
                                  "--out", str(tmp_path / "runs"), "--method", "kd", "--student", "resnet10t",
                                  "--input-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
                                  "--num-workers", "1", "-q"])
    assert trained.exit_code == 0, trained.output
    scored = runner.invoke(app, ["evaluate", "--distill", str(tmp_path / "runs"), "--run", "kd", "--val-shards", val,
                                 "--out", str(tmp_path / "eval"), "-q"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["epoch"] == 1
    logs += [info.output, checked.output, trained.output, scored.output]

    # no object, output file or log line holds a key, a secret or the endpoint
    secrets = [*server.writer, *server.reader, server.endpoint, server.endpoint.split("//")[1]]
    fs.invalidate_cache()
    written = [fs.cat_file(p) for p in fs.find(BUCKET)] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert [s for s in secrets if any(s.encode() in blob for blob in written)] == []
    assert [s for s in secrets if any(s in log for log in logs)] == []


@pytest.mark.slow
def test_read_only_credentials_read_everything_and_write_nothing(server, bucket, monkeypatch, tmp_path):
    _as(server, monkeypatch, server.writer)
    store = f"s3://{BUCKET}/ro.zarr"
    assert subprocess.run(_extract(store, bucket["pattern"]), capture_output=True, timeout=600).returncode == 0
    fs = fsspec.filesystem("s3")
    before = _objects(fs, store[5:])

    _as(server, monkeypatch, server.reader)
    info = runner.invoke(app, ["info", store, "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["shards"] == SHARDS, info.output
    checked = runner.invoke(app, ["verify", store])
    assert checked.exit_code == 0 and ", ok" in checked.output, checked.output
    trained = runner.invoke(app, ["distill", "--store", store, "--shards", f"s3://{BUCKET}/shards/train-000000.tar",
                                  "--val-shards", f"s3://{BUCKET}/shards/train-000001.tar", "--out",
                                  str(tmp_path / "runs"), "--method", "kd", "--student", "resnet10t", "--input-size",
                                  "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
                                  "--num-workers", "0", "-q"])
    assert trained.exit_code == 0, trained.output
    refused = runner.invoke(app, ["extract", bucket["pattern"], "--out", f"s3://{BUCKET}/other.zarr", *ARGS,
                                  "--dask-workers", "0"])
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 1 and len(lines) == 1, refused.output
    assert f"s3://{BUCKET}/other.zarr: cannot write" in lines[0] and "access denied" in lines[0], lines[0]
    assert not any(s in lines[0] for s in server.reader)
    _as(server, monkeypatch, server.writer)
    assert _objects(fsspec.filesystem("s3"), store[5:]) == before and not fsspec.filesystem("s3").exists(
        f"{BUCKET}/other.zarr/zarr.json")


def _one_line(result, *fragments: str) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bucket_mistakes_are_one_line_naming_the_url_without_a_credential(server, bucket, monkeypatch):
    _as(server, monkeypatch, server.writer)
    _one_line(runner.invoke(app, ["info", "s3://no-such-bucket/store.zarr"]),
              "s3://no-such-bucket/store.zarr: bucket no-such-bucket does not exist")
    _one_line(runner.invoke(app, ["info", f"s3://{BUCKET}/shards"]), f"s3://{BUCKET}/shards: no feature store here")
    _one_line(runner.invoke(app, ["info", "gs://somewhere/store.zarr"]),
              "gs://somewhere/store.zarr: gs:// needs the gcsfs package")
    _one_line(runner.invoke(app, ["info", "s3://x/s.zarr", "--storage-option", "endpoint-url"]),
              "--storage-option 'endpoint-url': expected KEY=VALUE")
    _as(server, monkeypatch, ("AKIANOTAKEYTHEYKNOW1", "not-their-secret"))
    line = _one_line(runner.invoke(app, ["info", f"s3://{BUCKET}/a.zarr"]),
                     f"s3://{BUCKET}/a.zarr: cannot open the store: access denied", "AWS_ACCESS_KEY_ID")
    assert "AKIANOTAKEYTHEYKNOW1" not in line and "not-their-secret" not in line
    _as(server, monkeypatch, server.writer, endpoint=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    line = _one_line(runner.invoke(app, ["info", f"s3://{BUCKET}/a.zarr"]),
                     f"s3://{BUCKET}/a.zarr: cannot open the store: the object store's endpoint does not answer")
    assert "127.0.0.1" not in line


def test_storage_options_reach_the_filesystem_and_are_never_recorded(server, bucket, monkeypatch, tmp_path):
    """--storage-option endpoint_url=... key=... secret=... instead of the environment."""
    _as(server, monkeypatch, ("AKIANOTAKEYTHEYKNOW1", "not-their-secret"), endpoint="http://127.0.0.1:9")
    key, secret = server.writer
    store = f"s3://{BUCKET}/options.zarr"
    options = ["--storage-option", f"endpoint_url={server.endpoint}", "--storage-option", f"key={key}",
               "--storage-option", f"secret={secret}"]
    done = runner.invoke(app, ["extract", f"s3://{BUCKET}/shards/train-000000.tar", "--out", store, *ARGS,
                               "--dask-workers", "0", *options])
    assert done.exit_code == 0, done.output
    info = runner.invoke(app, ["info", store, "--json", *options])
    assert info.exit_code == 0 and json.loads(info.output)["samples"] == PER_SHARD, info.output
    fs = fsspec.filesystem("s3", endpoint_url=server.endpoint, key=key, secret=secret, skip_instance_cache=True)
    blobs = [fs.cat_file(p) for p in fs.find(store[5:])]
    assert not any(s.encode() in blob for blob in blobs for s in (key, secret, server.endpoint.split("//")[1]))


def test_teacher_weights_by_url_are_fetched_recorded_without_credentials_and_recomputed(
        server, bucket, writer, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("gendd_pipe.models.teacher.WEIGHTS_CACHE", str(tmp_path / "cache" / "weights"))
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    writer.put_file(str(tmp_path / "model.safetensors"), f"{BUCKET}/teacher/model.safetensors")
    url, store = f"s3://{BUCKET}/teacher/model.safetensors", f"s3://{BUCKET}/by-url.zarr"
    args = [a if a != "none" else url for a in ARGS]
    done = runner.invoke(app, ["extract", f"s3://{BUCKET}/shards/train-000000.tar", "--out", store, *args,
                               "--dask-workers", "0"])
    assert done.exit_code == 0, done.output
    info = json.loads(runner.invoke(app, ["info", store, "--json"]).output)
    from gendd_pipe.files import file_sha256
    assert info["teacher"]["weights"] == url and info["teacher"]["num_classes"] == 10
    assert info["teacher"]["weights_sha256"] == file_sha256(str(tmp_path / "model.safetensors"))
    checked = runner.invoke(app, ["verify", store, "--recompute", "2"])
    assert checked.exit_code == 0 and ", ok" in checked.output, checked.output
    missing = runner.invoke(app, ["extract", f"s3://{BUCKET}/shards/train-000000.tar", "--out", str(tmp_path / "x"),
                                  *[a if a != "none" else url + ".gone" for a in ARGS], "--dask-workers", "0"])
    _one_line(missing, f"{url}.gone: no weights file here")
