"""CUDA and Triton-on-GPU backends of every op against the reference (runs on the GPU machine; skips here)."""

import numpy as np
import pytest
import torch

from covfast import _backend
from covfast.ops import reference

pytestmark = pytest.mark.cuda

LOW_PRECISION = [torch.float16, torch.bfloat16]
GPU_BACKENDS = ["cuda", "triton"]


def impl(op, backend):
    if not _backend._probe(backend, "cuda")[0]:
        pytest.skip(_backend._probe(backend, "cuda")[1])
    return _backend.implementation(op, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 1, 1), (2, 3, 7, 13, 4, 5), (2, 64, 44, 44, 22, 22), (1, 2048, 11, 11, 11, 11)]
)
def test_reverse_attention_float32(backend, shape):
    b, c, h_out, w_out, h, w = shape
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(b, c, h_out, w_out, device="cuda", generator=gen)
    side = 3 * torch.randn(b, 1, h, w, device="cuda", generator=gen)
    torch.testing.assert_close(impl("reverse_attention", backend)(x, side), reference.reverse_attention(x, side))
    grad = torch.randn_like(x)
    grad_x, grad_side = impl("reverse_attention_backward", backend)(grad, x, side)
    ref_x, ref_side = reference.reverse_attention_backward(grad, x, side)
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(grad_side, ref_side, rtol=1e-4, atol=1e-4 * c)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_reverse_attention_low_precision(backend, dtype):
    x = torch.randn(2, 16, 44, 44, device="cuda")
    side = 3 * torch.randn(2, 1, 22, 22, device="cuda")
    exact = reference.reverse_attention(x.double(), side.double())
    ref_err = (reference.reverse_attention(x.to(dtype), side.to(dtype)).double() - exact).abs().max()
    err = (impl("reverse_attention", backend)(x.to(dtype), side.to(dtype)).double() - exact).abs().max()
    assert err <= 2 * ref_err


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reverse_attention_non_contiguous_and_empty(backend):
    x = torch.randn(2, 3, 9, 8, device="cuda").transpose(2, 3)
    side = torch.randn(2, 1, 5, 4, device="cuda").transpose(2, 3)
    torch.testing.assert_close(impl("reverse_attention", backend)(x, side), reference.reverse_attention(x, side))
    empty = torch.empty(0, 3, 5, 5, device="cuda")
    assert impl("reverse_attention", backend)(empty, torch.empty(0, 1, 2, 2, device="cuda")).shape == empty.shape


def test_reverse_attention_autograd_and_compile_on_gpu():
    from covfast.ops import reverse_attention

    x = torch.randn(2, 8, 22, 22, device="cuda", requires_grad=True)
    side = torch.randn(2, 1, 11, 11, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.covfast.reverse_attention.default, (x, side))
    compiled = torch.compile(reverse_attention, fullgraph=True)
    torch.testing.assert_close(compiled(x, side), reference.reverse_attention(x, side))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 7, 13), (8, 1, 352, 352)])
def test_coach_mask_threshold_equals_kthvalue(shape, dtype, ties):
    score = torch.randn(shape, device="cuda")
    if ties:
        score = (score * 2).round() / 2
    score = score.to(dtype)
    n = shape[2] * shape[3]
    for keep in [1e-6, 0.05, 0.3, 0.5, 1.0]:
        mask = impl("coach_mask", "cuda")(score, keep, 6.0)
        k = reference.coach_k(keep, n)
        t = score.float().reshape(shape[0], -1).kthvalue(n - k + 1, dim=1).values.view(-1, 1, 1, 1)
        expected = torch.sigmoid(6.0 * (score.float() - t))
        torch.testing.assert_close(mask.float(), expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)


def test_coach_mask_negative_and_zero_scores():
    score = torch.tensor([[[[-0.0, 0.0, -1.5, 2.0, -3.0, 1e-30, -1e-30, 3e38]]]], device="cuda")
    for keep in [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0]:
        torch.testing.assert_close(impl("coach_mask", "cuda")(score, keep, 2.0), reference.coach_mask(score, keep, 2.0))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
def test_infection_ratio(backend, dtype):
    for shape in [(1, 1, 1), (2, 7, 13), (3, 37, 300), (4, 64, 64)]:
        lung = torch.randint(0, 4, shape, dtype=torch.uint8, device="cuda")
        if dtype == torch.uint8:
            infection = torch.randint(0, 3, shape, dtype=torch.uint8, device="cuda")
        else:
            infection = torch.rand(shape, device="cuda").to(dtype)
        for lung_view, infection_view in [(lung, infection), (lung.transpose(1, 2), infection.transpose(1, 2))]:
            got = impl("infection_ratio", backend)(lung_view, infection_view, 0.3)
            expected = reference.infection_ratio(lung_view.cpu(), infection_view.cpu(), 0.3)
            torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1].cpu(), expected[1], rtol=0, atol=0)
            np.testing.assert_allclose(got[2].cpu().numpy(), expected[2].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_infection_ratio_bad_class_and_empty(backend):
    classes = torch.zeros(2, 5, 40, dtype=torch.uint8, device="cuda")
    classes[1, 3, 37] = 7
    with pytest.raises(ValueError, match="0, 1 or 2"):
        impl("infection_ratio", backend)(torch.ones_like(classes), classes, 0.5)
    lung_voxels, infected, soft = impl("infection_ratio", backend)(
        torch.zeros(0, 4, 4, dtype=torch.uint8, device="cuda"), torch.zeros(0, 4, 4, device="cuda"), 0.5
    )
    assert lung_voxels.shape == (0, 2) and infected.shape == (0, 2, 2) and soft.shape == (0, 2)


def test_selector_prefers_cuda_on_gpu():
    with _backend.forced(None):
        assert _backend.select("infection_ratio", "cuda") == "cuda"
        assert _backend.select("reverse_attention", "cuda") == "cuda"
        assert _backend.select("coach_mask", "cuda") == "cuda"
