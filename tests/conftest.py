"""Shared test setup: Triton runs in its CPU interpreter when no CUDA GPU is present, and the ``cuda`` mark skips.

``TRITON_INTERPRET`` must be set before anything imports triton (kernels read it when they are decorated).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# `training/` runs from the source tree and is not installed; append (not prepend) the repository root so that
# `import covfast` still finds the installed package with its compiled extensions.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

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
