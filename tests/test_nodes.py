"""Two nodes without a shared filesystem: two real torchrun agents on loopback (c10d rendezvous, gloo), each in
a working directory of its own with a relative ``--out``, as two machines with node-local disks would run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from gendd_pipe.distill.checkpoint import read_checkpoint
from test_distill import _cli_args, _kill_tree, _lines

TIMEOUT = 600  # seconds: a hang (the nodes at different epochs, waiting on each other) fails the test


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(digit_store, roots, *extra) -> list[subprocess.Popen]:
    """One torchrun agent per root, node 0's first (ranks follow the agents' order of start), the rendezvous
    store on node 0's agent."""
    port = _port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    procs = []
    for node, root in enumerate(roots):
        os.makedirs(root, exist_ok=True)
        cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--rdzv-conf", f"is_host={str(node == 0).lower()}", "--local-addr", "127.0.0.1",
               "-m", "gendd_pipe.cli", *_cli_args(digit_store, "out", "--epochs", "3", "--device", "cpu", *extra)]
        procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
        time.sleep(1.0)  # node 0 starts first: the rendezvous orders ranks by the agents' process ids
    return procs


def _finish(procs) -> None:
    deadline = time.time() + TIMEOUT
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                _kill_tree(p.pid)
            raise AssertionError("the nodes hung (killed after the timeout)") from None
        assert proc.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_two_nodes_without_shared_storage_resume_together(digit_store, tmp_path):
    """SIGKILL both nodes (agents, ranks and loader workers) in epoch 2 and start both again with --resume: rank 0
    (node 0) decides and gives its checkpoint to node 1, which has none; the run ends with the uninterrupted run's
    weights, and rank 0's metrics hold each epoch once. Node 1 writes nothing."""
    whole = [tmp_path / "whole0", tmp_path / "whole1"]
    _finish(_nodes(digit_store, whole))
    killed = [tmp_path / "node0", tmp_path / "node1"]
    run = killed[0] / "out" / "runs" / "gendd"
    procs = _nodes(digit_store, killed)
    deadline = time.time() + TIMEOUT
    while not ((run / "last.safetensors").exists() and run.joinpath("metrics.jsonl").exists()):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "epoch 1 did not end"
        time.sleep(0.05)
    time.sleep(0.3 * _lines(whole[0] / "out" / "runs" / "gendd")[1]["train_seconds"])  # into epoch 2's steps
    for proc in procs:
        _kill_tree(proc.pid)
        proc.wait()
    assert [m["epoch"] for m in _lines(run)] == [1]
    _finish(_nodes(digit_store, killed, "--resume"))
    assert [m["epoch"] for m in _lines(run)] == [1, 2, 3]
    assert not (killed[1] / "out" / "runs" / "gendd" / "last.safetensors").exists()
    a = read_checkpoint(str(whole[0] / "out" / "runs" / "gendd" / "last.safetensors"))
    b = read_checkpoint(str(run / "last.safetensors"))
    assert b["distributed"]["world_size"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.slow
def test_a_refusal_only_rank_0_can_see_stops_every_rank(digit_store, tmp_path):
    """Rank 0's node holds a run in its --out, node 1's disk does not: both ranks stop with rank 0's one line,
    instead of node 1 training on and waiting for rank 0 until the timeout."""
    roots = [tmp_path / "node0", tmp_path / "node1"]
    run = roots[0] / "out" / "runs" / "gendd"
    run.mkdir(parents=True)
    (run / "last.safetensors").write_bytes(b"")
    procs = _nodes(digit_store, roots)
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                _kill_tree(p.pid)
            raise AssertionError("a rank went on without rank 0 (killed after the timeout)") from None
        assert proc.returncode != 0 and "holds a run already" in output, output[-3000:]
