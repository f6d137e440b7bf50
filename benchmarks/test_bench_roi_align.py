"""pytest-benchmark suite of ``covfast::roi_align`` (forward, backward) per backend, and of the fused slot path.

Workload: the diagnosis stage's RoI pooling -- features [16, 65, 64, 64] float32 (16 slices, 64 backbone channels +
the pooled infection probability), beta = 8 RoIs per slice, output 28 x 28, spatial_scale 0.25, aligned=True,
sampling_ratio 2 (what the pipeline uses) and -1 (adaptive). The C++ kernel is quoted as a ratio to the reference
measured in the same run (``test_ratios`` prints it). On a GPU, ``torchvision.ops.roi_align`` is timed beside
covfast's CUDA kernel when torchvision imports (issue 4: covfast at least as fast for the same output).

Fused path: the affinity head pads each slice's RoIs to beta by repetition. ``unfused`` pools the distinct RoIs and
gathers one copy per slot (what ``covfast.nn.affinity.pool_rois`` does); ``fused`` is ``roi_align_slots``, which
pools each distinct RoI once and writes every slot in the same kernel.
"""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, SMOKE, backends

import covfast.ops  # noqa: F401  (registers the implementations)
from covfast import _backend
from covfast.ops.roi import roi_align_slots

BATCH, CHANNELS, SIZE, BETA = (2, 3, 8, 2) if SMOKE else (16, 65, 64, 64 // 8)
OUTPUT = (4, 4) if SMOKE else (28, 28)
SCALE = 0.25
RESULTS: dict[str, float] = {}  # name -> best seconds, filled by the timed tests of this run

try:
    import torchvision

    HAS_TORCHVISION = HAS_CUDA
except (ImportError, RuntimeError):  # not installed, or built for another torch
    HAS_TORCHVISION = False


def boxes(gen, count):
    """Lesion-like boxes in input pixels of a (SIZE / SCALE)^2 view: sides of 1/16 to 5/8 of the view."""
    view = SIZE / SCALE
    side = (torch.rand(count, 2, generator=gen) * 9 + 1) / 16 * view
    corner = torch.rand(count, 2, generator=gen) * (view - side)
    return torch.cat([corner, corner + side], dim=1)


def workload():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    index = torch.arange(BATCH).repeat_interleave(BETA).float()[:, None]
    rois = torch.cat([index, boxes(gen, BATCH * BETA)], dim=1)
    return features.to(DEVICE), rois.to(DEVICE)


def slot_workload():
    """Distinct RoIs and slots as in a diagnosis batch: slice i has 1 + i % BETA lesion boxes, repeated to BETA."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    rois, slot_roi = [], []
    for image in range(BATCH):
        count = 1 + image % BETA
        slot_roi += [len(rois) + j % count for j in range(BETA)]
        rois += [[float(image), *box] for box in boxes(gen, count).tolist()]
    return features.to(DEVICE), torch.tensor(rois, device=DEVICE), torch.tensor(slot_roi, device=DEVICE)


def record(benchmark, name):
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS[name] = benchmark.stats.stats.min
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"


def implementations():
    return [*backends("roi_align"), *(["torchvision"] if HAS_TORCHVISION else [])]


def forward_fn(impl):
    if impl == "torchvision":
        return lambda f, r, size, scale, ratio, aligned: torchvision.ops.roi_align(f, r, size, scale, ratio, aligned)
    return _backend.implementation("roi_align", impl)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("impl", implementations())
def test_forward(timed, benchmark, impl, sampling_ratio):
    features, rois = workload()
    fn = forward_fn(impl)
    out = timed(fn, features, rois, OUTPUT, SCALE, sampling_ratio, True, rounds=5 if impl == "reference" else 20)
    assert out.shape == (BATCH * BETA, CHANNELS, *OUTPUT)
    record(benchmark, f"forward-{impl}-{sampling_ratio}")


def _torchvision_backward(grad, rois, shape, size, scale, ratio, aligned):
    features = torch.zeros(shape, device=grad.device, requires_grad=True)
    torchvision.ops.roi_align(features, rois, size, scale, ratio, aligned).backward(grad)
    return features.grad


@pytest.mark.parametrize("impl", implementations())
def test_backward(timed, benchmark, impl):
    features, rois = workload()
    grad = torch.randn(BATCH * BETA, CHANNELS, *OUTPUT, device=DEVICE)
    if impl == "torchvision":
        fn = _torchvision_backward  # includes torchvision's (cheap) zero forward: it has no separate backward entry
    else:
        fn = _backend.implementation("roi_align_backward", impl)
    out = timed(fn, grad, rois, list(features.shape), OUTPUT, SCALE, 2, True, rounds=3 if impl == "reference" else 20)
    assert out.shape == features.shape
    record(benchmark, f"backward-{impl}")


def _unfused(features, rois, slot_roi):
    impl = _backend.dispatch("roi_align", features.device.type)
    return impl(features, rois, OUTPUT, SCALE, 2, True)[slot_roi].reshape(BATCH, BETA, CHANNELS, *OUTPUT)


def _fused(features, rois, slot_roi):
    return roi_align_slots(features, rois, slot_roi, OUTPUT, SCALE, 2, True).reshape(BATCH, BETA, CHANNELS, *OUTPUT)


@pytest.mark.parametrize("path", ["unfused", "fused"])
def test_slots(timed, benchmark, path):
    features, rois, slot_roi = slot_workload()
    fn = _fused if path == "fused" else _unfused
    out = timed(fn, features, rois, slot_roi, rounds=30)
    assert out.shape == (BATCH, BETA, CHANNELS, *OUTPUT)
    record(benchmark, f"slots-{path}")


def test_ratios():
    """Prints the speed ratios of this run; the C++ forward must beat the reference by at least 5x."""
    fast = "cpp" if DEVICE == "cpu" else "cuda"
    if SMOKE or f"forward-{fast}-2" not in RESULTS or "forward-reference-2" not in RESULTS:
        pytest.skip("ratios need a full-size timed run with the reference")
    for ratio in (2, -1):
        speedup = RESULTS[f"forward-reference-{ratio}"] / RESULTS[f"forward-{fast}-{ratio}"]
        print(f"\nforward sampling_ratio={ratio}: {fast} {speedup:.1f}x reference")
        assert speedup >= 5
    if f"backward-{fast}" in RESULTS and "backward-reference" in RESULTS:
        print(f"backward: {fast} {RESULTS['backward-reference'] / RESULTS[f'backward-{fast}']:.1f}x reference")
    if "forward-torchvision-2" in RESULTS:
        print(f"forward: {fast} {RESULTS['forward-torchvision-2'] / RESULTS[f'forward-{fast}-2']:.2f}x torchvision")
    if "slots-fused" in RESULTS and "slots-unfused" in RESULTS:
        print(f"slots: fused {RESULTS['slots-unfused'] / RESULTS['slots-fused']:.2f}x unfused")
