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
