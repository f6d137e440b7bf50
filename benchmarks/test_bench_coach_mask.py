"""pytest-benchmark suite of ``covfast::coach_mask`` on 8 x 1 x 352 x 352 scores, per backend.

Target (issue 4, GPU): the CUDA radix-select kernel >= 5x ``torch.kthvalue`` + sigmoid + multiply (the reference,
followed by masking a 3-channel image as the coach network does).
"""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, SMOKE, backends

import covfast.ops  # noqa: F401  (registers the implementations)
from covfast import _backend

SHAPE = (2, 1, 9, 7) if SMOKE else (8, 1, 352, 352)


@pytest.mark.parametrize("with_image", [False, True], ids=["mask", "mask+image"])
@pytest.mark.parametrize("backend", backends("coach_mask"))
def test_coach_mask(timed, benchmark, backend, with_image):
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(SHAPE, generator=gen).to(DEVICE)
    image = torch.randn(SHAPE[0], 3, *SHAPE[2:], generator=gen).to(DEVICE)
    fn = _backend.implementation("coach_mask", backend)

    def run():
        mask = fn(score, 0.3, 10.0)
        return (mask, image * mask) if with_image else mask

    timed(run)
    if benchmark.stats is not None and HAS_CUDA:
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
