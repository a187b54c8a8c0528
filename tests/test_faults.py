"""Faults injected into real processes: SIGKILL at random moments, a full disk, an output turned read-only.

Each ends with nothing lost: the store a resumed or re-run extraction leaves equals
an uninterrupted extraction's byte for byte, and a reader watching the store the
whole time never sees an incomplete or damaged shard.

The full disk is a 2.6 MB tmpfs and the read-only output a tmpfs remounted
read-only mid-run, both inside a user and mount namespace (``unshare -Urm``):
the tests run as root, whom directory permissions do not stop, and need no
privilege beyond what an unprivileged user namespace gives.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gendd_pipe import FeatureStore, GenddError
from gendd_pipe.data.prepare import write_shards
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.models.teacher import TeacherConfig

SHARDS = 10
ARGS = ["--teacher", "resnet18", "--weights", "none", "--input-size", "64", "--views", "3", "--threads", "1",
        "--batch-size", "24", "--logits", "full", "-q"]
CONFIG = ExtractConfig(teacher=TeacherConfig("resnet18", "none", input_size=64), views=ViewConfig(count=3),
                       batch_size=24, logits="full", dask_workers=0, threads=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, mnist_records):
    """Ten shards of 24 digits and the store an uninterrupted in-process extraction makes of them."""
    root = tmp_path_factory.mktemp("faults")
    write_shards(mnist_records[: 24 * SHARDS], str(root / "shards"), "train", 24)
    pattern = str(root / "shards" / f"train-{{000000..{SHARDS - 1:06d}}}.tar")
    start = time.perf_counter()
    extract([pattern], str(root / "clean.zarr"), CONFIG, progress=False)
    return {"pattern": pattern, "clean": root / "clean.zarr", "seconds": time.perf_counter() - start}


def _command(pattern: str, store: Path, workers: int = 0, quiet: bool = True) -> list[str]:
    args = ARGS if quiet else [a for a in ARGS if a != "-q"]
    return [sys.executable, "-m", "gendd_pipe.cli", "extract", pattern, "--out", str(store), *args,
            "--dask-workers", str(workers)]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def _wait_for_start(proc: subprocess.Popen, started: threading.Event) -> None:
    """Drain the process's output; set ``started`` at its line saying how many shards are left to do."""
    for line in proc.stdout:
        if "shards to extract" in line:
            started.set()
    started.set()  # it ended first


def _complete(store: Path) -> int:
    return sum('"complete": true' in p.read_text() for p in store.glob("shards/*/zarr.json"))


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store but the config.yaml the CLI writes at its root (it names its --out)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


class Watcher(threading.Thread):
    """Reads every shard a store shows, checksums included, again and again, until stopped."""

    def __init__(self, store: Path):
        super().__init__(daemon=True)
        self.store, self.stop, self.reads, self.problems = store, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                store = FeatureStore.open(str(self.store))
            except GenddError:  # nothing, or no manifest, written yet
                time.sleep(0.02)
                continue
            for name in store.shard_names:
                try:
                    data = store.read_shard(name)
                    if len(data["keys"]) != 24:
                        self.problems.append(f"{name}: {len(data['keys'])} rows")
                except Exception as exc:  # noqa: BLE001 - any failure is what the test looks for
                    self.problems.append(f"{name}: {exc}")
                self.reads += 1
            time.sleep(0.02)


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_then_resume_equal_an_uninterrupted_run(tmp_path, inputs):
    store, rng = tmp_path / "killed.zarr", random.Random(11)
    watcher = Watcher(store)
    watcher.start()
    kills = []
    for i in range(10):
        workers = i % 2  # in process, then the driver and a Dask worker process (whose start takes seconds)
        proc = subprocess.Popen(_command(inputs["pattern"], store, workers, quiet=False), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = threading.Event()
        threading.Thread(target=_wait_for_start, args=(proc, started), daemon=True).start()
        _wait_for(started.is_set, proc)  # the teacher is built, the store open: "N of 10 shards to extract"
        before = _complete(store)
        # a random moment in the first or second shard this run writes (a Dask worker takes seconds to start)
        target = min(before + rng.randint(0, 1), SHARDS)
        _wait_for(lambda: _complete(store) >= target, proc)
        time.sleep(rng.uniform(0, inputs["seconds"] / SHARDS))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((before, _complete(store), proc.returncode))
    mid_work = [k for k in kills if k[2] == -signal.SIGKILL and k[0] < SHARDS]
    assert len(mid_work) >= 6 and any(after > before for before, after, _ in mid_work), kills
    resumed = subprocess.run(_command(inputs["pattern"], store), capture_output=True, text=True, timeout=600)
    watcher.stop.set()
    watcher.join()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert watcher.problems == [] and watcher.reads > 0
    a, b = _files(store), _files(inputs["clean"])
    assert a.keys() == b.keys() and [name for name in a if a[name] != b[name]] == []


def _namespace_or_skip() -> None:
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount a tmpfs ({probe.stderr.decode().strip()})")


def _in_namespace(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-Urm", "bash", "-c", script], capture_output=True, text=True, timeout=timeout)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full disk", "read-only output"])
def test_a_failing_disk_is_one_line_and_a_rerun_finishes(tmp_path, inputs, fault):
    _namespace_or_skip()
    mount, saved = tmp_path / "mnt", tmp_path / "saved.zarr"
    mount.mkdir()
    command = " ".join(_command(inputs["pattern"], mount / "s.zarr"))
    if fault == "full disk":  # room for some shards, not all
        run = f"rc=0; {command} > {tmp_path}/out.txt 2>&1 || rc=$?; echo $rc > {tmp_path}/rc"
        size = "2600k"  # the teacher head (2 MB) and a few shards (0.2 MB each, with full logits)
    else:  # writable until the first shard is complete, then read-only
        run = (f"{command} > {tmp_path}/out.txt 2>&1 & pid=$!; "
               f"until grep -qs '\"complete\": true' {mount}/s.zarr/shards/*/zarr.json || ! kill -0 $pid; "
               f"do sleep 0.05; done; until mount -o remount,ro {mount}; do sleep 0.01; done; "  # busy while a file is open
               f"rc=0; wait $pid || rc=$?; echo $rc > {tmp_path}/rc")
        size = "64m"
    done = _in_namespace(f"set -e; mount -t tmpfs -o size={size} tmpfs {mount}; {run}; "
                         f"cp -a {mount}/s.zarr {saved}")
    assert done.returncode == 0, done.stdout + done.stderr
    output, rc = (tmp_path / "out.txt").read_text(), int((tmp_path / "rc").read_text())
    lines = _error_lines(output)
    reason = "No space left on device" if fault == "full disk" else "Read-only file system"
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"error: {mount / 's.zarr'}: cannot write"), output
    assert reason in lines[0] and "complete shards are kept, re-run to resume" in lines[0], output
    kept = FeatureStore.open(str(saved))
    assert 1 <= len(kept.shard_names) < SHARDS  # the shards completed before the fault
    for name in kept.shard_names:
        kept.read_shard(name)  # whole, checksums included
    again = subprocess.run(_command(inputs["pattern"], saved), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    a, b = _files(saved), _files(inputs["clean"])
    assert a.keys() == b.keys() and [name for name in a if a[name] != b[name]] == []
    shutil.rmtree(saved)


@pytest.mark.slow
def test_two_extractions_started_together_write_each_shard_once(tmp_path, inputs):
    """Two ``extract`` processes started at the same moment on one new store: the root and each feature shard
    are written by exactly one of them (its lease), both exit 0, and the store equals a single run's."""
    store = tmp_path / "together.zarr"
    command = [a for a in _command(inputs["pattern"], store) if a != "-q"] + ["-v"]  # a debug line per shard
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in (0, 1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [out[-2000:] for out in outputs]
    written = [re.findall(r"feature shard (train-\d+): \d+ samples", out) for out in outputs]
    assert sorted(written[0] + written[1]) == [f"train-{i:06d}" for i in range(SHARDS)], written
    for a, b in ((0, 1), (1, 0)):  # a writer ready while two shards were left to the other takes one of them
        started, finished = _stamps(outputs[b], "shards to extract"), _stamps(outputs[a], "feature shard")
        if len(finished) >= 2 and started[0] < finished[-2]:
            assert written[b], (written, started, finished)
    assert _files(store) == _files(inputs["clean"])
    assert not list((store / "leases").iterdir())


def _stamps(output: str, marker: str) -> list[str]:
    """The log times (``%Y-%m-%d %H:%M:%S,mmm``: they sort as text) of the lines holding ``marker``."""
    return [line[:23] for line in output.splitlines() if marker in line and line[:4].isdigit()]


@pytest.mark.slow
def test_another_teacher_on_a_store_being_written_is_refused_and_harms_nothing(tmp_path, inputs):
    store = tmp_path / "busy.zarr"
    proc = subprocess.Popen(_command(inputs["pattern"], store), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_for(lambda: _complete(store) >= 1, proc)
    other = [a if a != "resnet18" else "resnet10t" for a in _command(inputs["pattern"], store)]
    refused = subprocess.run(other, capture_output=True, text=True, timeout=300)
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and "written with another teacher" in lines[0], lines
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-2000:]
    assert _files(store) == _files(inputs["clean"])


def _dask(*args: str, log: Path) -> subprocess.Popen:
    """A ``dask`` CLI process (scheduler or worker) in a session of its own, its output in ``log``."""
    command = [os.path.join(os.path.dirname(sys.executable), "dask"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


@pytest.mark.slow
def test_a_dask_worker_killed_mid_shard_is_retried_elsewhere_and_the_store_is_unchanged(tmp_path, inputs):
    """A real ``dask scheduler`` and two ``dask worker`` processes on loopback; one worker (nanny and all) is
    SIGKILLed while it writes a shard. The scheduler re-runs that shard on the other worker; readers never see
    the half-written shard as complete; the store equals the in-process run's byte for byte (one torch thread
    everywhere); the driver's progress ends at every image once."""
    from distributed import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address, procs = f"tcp://127.0.0.1:{port}", []
    try:
        procs.append(_dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
                           log=tmp_path / "scheduler.log"))
        for i in (0, 1):
            procs.append(_dask("worker", address, "--nthreads", "1", "--name", f"w{i}", "--no-dashboard",
                               log=tmp_path / f"w{i}.log"))
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
            store, watcher = tmp_path / "cluster.zarr", Watcher(tmp_path / "cluster.zarr")
            watcher.start()
            driver = subprocess.Popen([*_command(inputs["pattern"], store, quiet=False), "--scheduler", address],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output: list[str] = []
            reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
            reader.start()
            _wait_for(lambda: _complete(store) >= 2, driver)  # both workers have their teacher and are busy
            victim = next(addr for addr, w in client.scheduler_info()["workers"].items() if w["name"] == "w0")
            busy = client.processing()[victim]
            os.killpg(procs[1].pid, signal.SIGKILL)
            assert driver.wait(timeout=600) == 0, "".join(output)[-3000:]
            reader.join(timeout=10)
        watcher.stop.set()
        watcher.join()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert busy, "w0 was running no shard when it was killed"
    assert watcher.problems == [] and watcher.reads > 0
    assert _files(store) == _files(inputs["clean"])
    progress = [m.groups() for m in map(re.compile(r"extract: (\d+)/\d+ shards, ([\d,]+) images").search, output) if m]
    assert progress and progress[-1] == (str(SHARDS), f"{SHARDS * 24:,}"), "".join(output)


@pytest.mark.slow
def test_a_shard_held_by_a_live_writer_that_makes_no_progress_is_one_line_and_the_rest_is_kept(tmp_path, inputs):
    from gendd_pipe.store.lease import Leases

    store = tmp_path / "held.zarr"
    with Leases(str(store)) as held:  # a live writer (this process) holding one shard and never writing it
        assert held.take("train-000003")
        done = subprocess.run([*_command(inputs["pattern"], store), "--set", "extract.lease_wait=4"],
                              capture_output=True, text=True, timeout=600)
    lines = _error_lines(done.stdout + done.stderr)
    assert done.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {store}: shard train-000003 is held by another extraction") and \
        f"pid {os.getpid()}" in lines[0], lines[0]
    kept = FeatureStore.open(str(store))
    assert len(kept.shard_names) == SHARDS - 1 and [s["name"] for s in kept.manifest["shards"]] == kept.shard_names
    again = subprocess.run(_command(inputs["pattern"], store), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr  # the lease released, a re-run finishes
    a, b = _files(store), _files(inputs["clean"])
    assert {k: v for k, v in a.items() if k != "zarr.json"} == {k: v for k, v in b.items() if k != "zarr.json"}
    manifests = [FeatureStore.open(str(s)).manifest for s in (store, inputs["clean"])]
    for m in manifests:  # the shard held back is listed last, after the ones complete before it
        m["shards"].sort(key=lambda entry: entry["name"])
    assert manifests[0] == manifests[1]
