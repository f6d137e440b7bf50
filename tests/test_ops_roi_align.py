"""covfast::roi_align per backend: the naive float64 oracle of test_ops_affinity_roi, odd / tiny / empty /
non-contiguous inputs, boxes on and beyond the border, the backward against the reference's adjoint, gradcheck and
opcheck with the backend pinned."""

import numpy as np
import pytest
import torch
from test_ops_affinity_roi import make_rois, roi_align_oracle

from covfast import _backend
from covfast.ops import roi_align
from covfast.ops.roi import roi_align_slots

CPU_BACKENDS = ["reference", "cpp", "triton"]
# float32 keeps coordinates in float32 like torchvision, so the tolerance covers coordinate rounding too.
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)}


def require(backend):
    if not _backend._probe(backend, "cpu")[0]:
        pytest.skip(_backend._probe(backend, "cpu")[1])


def fresh_generator():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def pooled(backend, features, rois, output_size, scale, sampling_ratio, aligned):
    """The public op with ``backend`` pinned (so the custom op's checks and autograd run too)."""
    require(backend)
    with _backend.forced(backend):
        return roi_align(features, rois, output_size, scale, sampling_ratio, aligned)


def assert_matches_oracle(out, features, rois, output_size, scale, sampling_ratio, aligned):
    expected = roi_align_oracle(features, rois, output_size, scale, sampling_ratio, aligned)
    rtol, atol = TOLERANCES[out.dtype]
    assert out.dtype == features.dtype and out.shape == expected.shape
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_matches_oracle(backend, dtype, aligned, sampling_ratio):
    gen = fresh_generator()
    for batch, channels, height, width, output_size, scale in [(2, 3, 13, 17, (3, 5), 0.5), (1, 2, 7, 13, (2, 2), 1.0)]:
        features = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
        rois = make_rois(gen, batch, height, width, 5, scale)
        out = pooled(backend, features.to(dtype), rois.to(dtype), output_size, scale, sampling_ratio, aligned)
        assert_matches_oracle(out, features.to(dtype), rois.to(dtype), output_size, scale, sampling_ratio, aligned)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_and_odd_shapes(backend):
    gen = fresh_generator()
    cases = [  # (features shape, rois, output size): a 1 x 1 map, a 1 x 13 row, 1 x 1 output, a long thin box
        ((1, 1, 1, 1), [[0.0, 0.0, 0.0, 1.0, 1.0]], (1, 1)),
        ((1, 2, 1, 13), [[0.0, 0.5, -0.5, 11.0, 0.7]], (1, 3)),
        ((2, 5, 7, 13), [[1.0, 0.0, 0.0, 13.0, 7.0], [0.0, 6.0, 1.0, 6.2, 6.9]], (7, 1)),
    ]
    for shape, boxes, output_size in cases:
        features = torch.randn(*shape, generator=gen, dtype=torch.float64)
        rois = torch.tensor(boxes, dtype=torch.float64)
        for aligned in (False, True):
            out = pooled(backend, features, rois, output_size, 1.0, -1, aligned)
            assert_matches_oracle(out, features, rois, output_size, 1.0, -1, aligned)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_boxes_on_and_outside_the_border(backend):
    gen = fresh_generator()
    features = torch.randn(1, 3, 9, 11, generator=gen, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0.0, -3.0, -3.0, 2.0, 2.0],  # straddles the top-left corner
            [0.0, 8.0, 6.0, 14.0, 12.0],  # straddles the bottom-right corner
            [0.0, -1.0, -1.0, 11.0, 9.0],  # the whole map, samples within [-1, 0) and (W - 1, W]
            [0.0, 20.0, 20.0, 30.0, 25.0],  # entirely outside: every sample contributes 0
            [0.0, 5.0, 4.0, 3.0, 2.0],  # x2 < x1, y2 < y1
        ],
        dtype=torch.float64,
    )
    for aligned in (False, True):
        for sampling_ratio in (-1, 3):
            out = pooled(backend, features, rois, (4, 3), 1.0, sampling_ratio, aligned)
            assert_matches_oracle(out, features, rois, (4, 3), 1.0, sampling_ratio, aligned)
            assert torch.all(out[3] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_non_contiguous(backend):
    gen = fresh_generator()
    base = torch.randn(2, 9, 12, 10, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, 2, 10, 6, 4, 1.0)
    views = [base.transpose(2, 3)[:, ::2], base[:, 1::3, ::2, 1:7].transpose(2, 3), base.permute(0, 2, 3, 1)[..., :4]]
    strided_rois = torch.empty(rois.shape[0], 10, dtype=torch.float64)[:, ::2].copy_(rois)
    for features in views:
        assert not features.is_contiguous() and not strided_rois.is_contiguous()
        out = pooled(backend, features, strided_rois, (3, 2), 1.0, 2, True)
        assert_matches_oracle(out, features.contiguous(), rois, (3, 2), 1.0, 2, True)
    empty = pooled(backend, base, torch.empty(0, 5, dtype=torch.float64), (3, 3), 1.0, -1, True)
    assert empty.shape == (0, 9, 3, 3)
    no_channels = pooled(backend, base[:, :0], rois, (2, 2), 1.0, -1, True)
    assert no_channels.shape == (4, 0, 2, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_batch_index(backend):
    require(backend)
    features = torch.zeros(2, 1, 4, 4)
    for index in (2.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="batch index"):
            pooled(backend, features, torch.tensor([[index, 0.0, 0.0, 2.0, 2.0]]), 2, 1.0, -1, True)


def backward_case(gen):
    """features [2, 3, 10, 9], 6 RoIs at scale 0.5 and a non-contiguous gradient [6, 3, 4, 3], float64."""
    features = torch.randn(2, 3, 10, 9, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, 2, 10, 9, 6, 0.5)
    return features, rois, torch.randn(6, 3, 4, 6, generator=gen, dtype=torch.float64)[..., ::2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
def test_backward_matches_reference_adjoint(backend, aligned):
    """The gradient is the adjoint of the forward: <roi_align(f), g> = <f, roi_align_backward(g)> for all f, g."""
    require(backend)
    features, rois, grad = backward_case(fresh_generator())
    args = (rois, list(features.shape), (4, 3), 0.5, -1, aligned)
    result = _backend.implementation("roi_align_backward", backend)(grad, *args)
    expected = _backend.implementation("roi_align_backward", "reference")(grad, *args)
    np.testing.assert_allclose(result.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    forward = roi_align_oracle(features, rois, (4, 3), 0.5, -1, aligned)
    assert np.isclose((forward * grad.numpy()).sum(), (features * result).sum().item(), rtol=1e-10)
    result32 = _backend.implementation("roi_align_backward", backend)(grad.float(), rois.float(), *args[1:])
    np.testing.assert_allclose(result32.double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_and_opcheck(backend, aligned, seed):
    require(backend)
    gen = torch.Generator().manual_seed(seed)
    # the Triton interpreter is slow per call, and gradcheck makes 2 calls per feature element
    batch, channels, height, width = (1, 1, 4, 5) if backend == "triton" else (2, 2, 6, 7)
    features = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = make_rois(gen, batch, height, width, 3, scale=1.0)
    with _backend.forced(backend):
        assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 1.0, -1, aligned), (features,))
        torch.library.opcheck(torch.ops.covfast.roi_align.default, (features, rois, [2, 3], 1.0, 2, aligned))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_error_bound(backend):
    """float16 / bfloat16: the error against the float32 result is at most 2x that of the reference in that dtype."""
    gen = fresh_generator()
    features = torch.randn(2, 4, 12, 11, generator=gen)
    rois = make_rois(gen, 2, 12, 11, 5, 1.0).float()
    exact = pooled("reference", features, rois, (3, 4), 1.0, 2, True)
    for dtype in (torch.float16, torch.bfloat16):
        low = pooled(backend, features.to(dtype), rois.to(dtype), (3, 4), 1.0, 2, True)
        ref = pooled("reference", features.to(dtype), rois.to(dtype), (3, 4), 1.0, 2, True)
        assert low.dtype == dtype
        assert (low.float() - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-6


def test_cpu_picks_cpp():
    if not _backend._probe("cpp", "cpu")[0]:
        pytest.skip("covfast._C not built")
    with _backend.forced(None):
        assert _backend.select("roi_align", "cpu") == "cpp"
        assert _backend.select("roi_align_backward", "cpu") == "cpp"


def slot_workload(gen, dtype=torch.float64):
    """3 slices, each with beta = 5 rows filled by repeating its 1-3 distinct boxes (as the affinity head pads)."""
    features = torch.randn(3, 4, 11, 12, generator=gen, dtype=torch.float64)
    distinct = [make_rois(gen, 3, 11, 12, n, 1.0) for n in (1, 3, 2)]
    for image, rois in enumerate(distinct):
        rois[:, 0] = image
    first = [0, 1, 4]
    slot_roi = torch.tensor([first[i] + j % len(distinct[i]) for i in range(3) for j in range(5)])
    return features.to(dtype), torch.cat(distinct).to(dtype), slot_roi


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slots_equal_pool_then_gather(backend, dtype):
    require(backend)
    features, rois, slot_roi = slot_workload(fresh_generator(), dtype)
    rtol, atol = TOLERANCES[dtype]
    # rows of one RoI adjacent (as the head pads), then in random order
    for order in (slot_roi, slot_roi[torch.randperm(slot_roi.numel())]):
        with _backend.forced(backend):
            out = roi_align_slots(features, rois, order, (3, 4), 1.0, 2, True)
        assert out.shape == (15, 4, 3, 4)
        assert_matches_oracle(out, features, rois[order], (3, 4), 1.0, 2, True)
    unused = torch.cat([rois, rois[:1] + 1])  # a RoI no row names is skipped
    with _backend.forced(backend):
        out = roi_align_slots(features, unused, slot_roi, (3, 4), 1.0, 2, True)
    np.testing.assert_allclose(
        out.numpy(), pooled("reference", features, rois[slot_roi], (3, 4), 1.0, 2, True).numpy(), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_slots_gradcheck_opcheck_and_bad_input(backend):
    require(backend)
    features, rois, slot_roi = slot_workload(torch.Generator().manual_seed(3))
    features.requires_grad_(True)
    with _backend.forced(backend):
        assert torch.autograd.gradcheck(
            lambda f: roi_align_slots(f, rois, slot_roi, (2, 3), 1.0, -1, True), (features,)
        )
        torch.library.opcheck(
            torch.ops.covfast.roi_align_slots.default, (features, rois, slot_roi, [2, 3], 1.0, 2, True)
        )
        with pytest.raises(ValueError, match="outside"):
            roi_align_slots(features, rois, torch.tensor([0, 6]), 2)
        with pytest.raises(ValueError, match="int64"):
            roi_align_slots(features, rois, slot_roi.int(), 2)
        assert roi_align_slots(features, rois, torch.empty(0, dtype=torch.int64), 2).shape == (0, 4, 2, 2)


GPU_BACKENDS = ["cuda", "triton"]


def require_gpu(backend):
    if not _backend._probe(backend, "cuda")[0]:
        pytest.skip(_backend._probe(backend, "cuda")[1])


def gpu_pooled(backend, features, rois, *args):
    require_gpu(backend)
    with _backend.forced(backend):
        return roi_align(features.cuda(), rois.cuda(), *args).cpu()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gpu_matches_oracle(backend, dtype, aligned, sampling_ratio):
    gen = fresh_generator()
    features = torch.randn(3, 5, 21, 19, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, 3, 21, 19, 9, 0.5)
    features_view = features.to(dtype).transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided
    out = gpu_pooled(backend, features_view, rois.to(dtype), (7, 5), 0.5, sampling_ratio, aligned)
    assert_matches_oracle(out, features.to(dtype), rois.to(dtype), (7, 5), 0.5, sampling_ratio, aligned)
    assert gpu_pooled(backend, features, rois[:0], (2, 2), 0.5, -1, aligned).shape == (0, 5, 2, 2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
def test_gpu_backward_and_gradcheck(backend, aligned):
    require_gpu(backend)
    gen = fresh_generator()
    features, rois, grad = backward_case(gen)
    args = (list(features.shape), (4, 3), 0.5, -1, aligned)
    expected = _backend.implementation("roi_align_backward", "reference")(grad, rois, *args)
    backward = _backend.implementation("roi_align_backward", backend)
    for dtype, (rtol, atol) in TOLERANCES.items():
        result = backward(grad.to("cuda", dtype), rois.to("cuda", dtype), *args)
        np.testing.assert_allclose(result.double().cpu().numpy(), expected.numpy(), rtol=rtol, atol=atol)
    small = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64).cuda().requires_grad_(True)
    small_rois = make_rois(gen, 2, 6, 7, 3, 1.0).cuda()
    with _backend.forced(backend):
        assert torch.autograd.gradcheck(lambda f: roi_align(f, small_rois, (2, 3), 1.0, -1, aligned), (small,))
        torch.library.opcheck(torch.ops.covfast.roi_align.default, (small, small_rois, [2, 3], 1.0, 2, aligned))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_low_precision_error_bound(backend):
    require_gpu(backend)
    gen = fresh_generator()
    features = torch.randn(2, 8, 33, 30, generator=gen).cuda()
    rois = make_rois(gen, 2, 33, 30, 12, 1.0).float().cuda()
    with _backend.forced("reference"):
        exact = roi_align(features, rois, (7, 7), 1.0, 2, True)
    for dtype in (torch.float16, torch.bfloat16):
        with _backend.forced("reference"):
            ref = roi_align(features.to(dtype), rois.to(dtype), (7, 7), 1.0, 2, True)
        with _backend.forced(backend):
            low = roi_align(features.to(dtype), rois.to(dtype), (7, 7), 1.0, 2, True)
        assert low.dtype == dtype
        assert (low.float() - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gpu_matches_torchvision(backend, aligned, sampling_ratio):
    """Forward and backward against ``torchvision.ops.roi_align`` on the same float32 inputs."""
    torchvision = pytest.importorskip("torchvision")
    require_gpu(backend)
    gen = fresh_generator()
    features = torch.randn(4, 65, 64, 64, generator=gen).cuda()
    rois = make_rois(gen, 4, 64, 64, 32, 0.25).float().cuda()
    grad = torch.randn(32, 65, 28, 28, generator=gen).cuda()
    leaf = features.clone().requires_grad_(True)
    expected = torchvision.ops.roi_align(leaf, rois, (28, 28), 0.25, sampling_ratio, aligned)
    expected.backward(grad)
    mine = features.clone().requires_grad_(True)
    with _backend.forced(backend):
        out = roi_align(mine, rois, (28, 28), 0.25, sampling_ratio, aligned)
    out.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.grad, leaf.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_gpu_picks_cuda():
    require_gpu("cuda")
    with _backend.forced(None):
        assert _backend.select("roi_align", "cuda") == "cuda"
        assert _backend.select("roi_align_backward", "cuda") == "cuda"
