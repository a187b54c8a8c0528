"""The benchmark scripts import the library as it is now: each one starts and prints its usage."""

import glob
import os
import subprocess
import sys

import pytest

from tests.test_recipes import ROOT


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))), ids=os.path.basename)
def test_benchmark_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_the_gpu_check_runs_its_cpu_parts_and_prints_the_table():
    """``benchmarks/gpu_check.py`` without a GPU: the parts that need one say so, the others run small and pass."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--images", "64"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 20")]
    assert [row.split(" | ")[2] for row in rows] == ["cuda-tests", "suite", "extract", "distill-bench", "torchrun"]
    assert sum("skipped: needs a GPU" in row for row in rows) == 3 and sum("| ok: " in row for row in rows) == 2
