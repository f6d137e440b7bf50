"""Shared test setup: Triton runs in its CPU interpreter when no CUDA GPU is present, and the ``cuda`` mark skips.

``TRITON_INTERPRET`` must be set before anything imports triton (kernels read it when they are decorated).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
