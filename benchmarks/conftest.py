"""Shared benchmark setup: device choice, synchronizing timers, and the smoke mode the test suite uses.

``COVFAST_BENCH_SMOKE=1`` shrinks every size so ``tests/test_ops_bench_smoke.py`` can run the suites in seconds.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
SMOKE = os.environ.get("COVFAST_BENCH_SMOKE") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def backends(op: str) -> list[str]:
    """Backends to time for ``op`` on this machine: all usable ones (Triton on CPU only in smoke mode)."""
    from covfast import _backend

    names = []
    for name in _backend.BACKENDS:
        if (op, name) not in _backend._IMPLS and name != "reference":
            continue
        if name == "triton" and DEVICE == "cpu" and not SMOKE:
            continue
        if _backend._usable(op, name, DEVICE):
            names.append(name)
    return names


@pytest.fixture
def timed(benchmark):
    """``timed(fn, *args)``: benchmark ``fn`` with a device synchronize inside the timed call."""

    def run(fn, *args, rounds=15):
        def call():
            out = fn(*args)
            if HAS_CUDA:
                torch.cuda.synchronize()
            return out

        return benchmark.pedantic(call, rounds=3 if SMOKE else rounds, warmup_rounds=1, iterations=1)

    return run
