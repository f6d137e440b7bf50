"""Shared test setup: Triton runs in its CPU interpreter when no CUDA GPU is present, and the ``cuda`` mark skips.

``TRITON_INTERPRET`` must be set before anything imports triton (kernels read it when they are decorated).
ONNX exports and engines go to a folder of the test run (``COVFAST_ENGINE_DIR``), never to the user's cache; the
benchmark suites that the smoke test runs in a subprocess inherit it.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
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


def pytest_configure(config):
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("covfast_engines") if cache is not None else tempfile.mkdtemp(prefix="covfast_engines_")
    os.environ["COVFAST_ENGINE_DIR"] = str(folder)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def sample_slab():
    """Five lung slices of the shipped sample (real CT, resampled COVID-CT-MD P001) with their lung mask."""
    from covfast.io import load_volume, sample_path
    from covfast.pipeline.lung import lung_mask

    volume = load_volume(str(sample_path()))
    lung = lung_mask(volume.hu, volume.spacing_mm)
    mid = int(np.flatnonzero(lung.reshape(len(lung), -1).any(axis=1)).mean())
    return np.ascontiguousarray(volume.hu[mid - 2 : mid + 3]), np.ascontiguousarray(lung[mid - 2 : mid + 3])
