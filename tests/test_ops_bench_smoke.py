"""Runs every benchmark suite once at tiny sizes (COVFAST_BENCH_SMOKE=1) so the suites never rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("suite", sorted(p.name for p in BENCHMARKS.glob("test_bench_*.py")))
def test_benchmark_suite_smoke(suite):
    env = {**os.environ, "COVFAST_BENCH_SMOKE": "1"}
    # Run from benchmarks/: `python -m` puts the working directory first on sys.path, and from the repository root
    # that would import the source tree's covfast (no compiled extension, no covfast.kernels) over the installed one.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-enable", str(BENCHMARKS / suite)],
        env=env,
        cwd=BENCHMARKS,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
