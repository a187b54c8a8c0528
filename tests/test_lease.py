"""Leases on a store: one writer per shard, a dead writer's lease taken over, a live one respected."""

import json
import socket
import subprocess
import sys
import time

import psutil

from gendd_pipe.store.lease import LEASES, Leases


def test_one_writer_holds_a_lease_until_it_releases_it(tmp_path):
    store = str(tmp_path / "store.zarr")
    with Leases(store) as a, Leases(store) as b:
        assert a.take("train-000000") and a.take("train-000000")  # held already: still True
        assert not b.take("train-000000")
        assert b.holder("train-000000")["owner"] == a.owner
        a.release("train-000000")
        assert b.holder("train-000000") is None and b.take("train-000000")
    assert list((tmp_path / "store.zarr" / LEASES).iterdir()) == []  # leaving releases every lease


def test_a_renewed_lease_outlives_its_ttl(tmp_path):
    store = str(tmp_path / "store.zarr")
    with Leases(store, ttl=0.4) as a:
        assert a.take("x")
        time.sleep(1.2)  # three lifetimes, renewed every 0.1 s
        assert not Leases(store).take("x")


def _lease_file(tmp_path, name: str, generation: int, **lease) -> None:
    (tmp_path / "store.zarr" / LEASES).mkdir(parents=True, exist_ok=True)
    (tmp_path / "store.zarr" / LEASES / f"{name}.{generation}").write_text(json.dumps(lease))


def test_an_expired_lease_is_taken_over_by_the_next_generation(tmp_path):
    _lease_file(tmp_path, "x", 0, owner="gone", host="elsewhere", pid=1, expires=time.time() - 1)
    taker = Leases(str(tmp_path / "store.zarr"))
    assert taker.take("x") and taker.held == {"x": 1}
    assert not Leases(str(tmp_path / "store.zarr")).take("x")  # generation 1 is live now
    taker.release("x")
    assert list((tmp_path / "store.zarr" / LEASES).iterdir()) == []


def test_a_lease_of_a_process_gone_from_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    _lease_file(tmp_path, "x", 0, owner="killed", host=socket.gethostname(), pid=pid, started=0.0,
                expires=time.time() + 300)
    assert Leases(str(tmp_path / "store.zarr")).take("x")
    me = psutil.Process()  # a live process on this host keeps its lease
    _lease_file(tmp_path, "y", 0, owner="live", host=socket.gethostname(), pid=me.pid, started=me.create_time(),
                expires=time.time() + 300)
    assert not Leases(str(tmp_path / "store.zarr")).take("y")


def test_a_lease_caught_between_create_and_write_is_live(tmp_path):
    (tmp_path / "store.zarr" / LEASES).mkdir(parents=True)
    (tmp_path / "store.zarr" / LEASES / "x.0").write_bytes(b"")  # O_EXCL done, the JSON not yet written
    assert not Leases(str(tmp_path / "store.zarr")).take("x")
