"""covfast::reverse_attention: reference vs a naive float64 numpy oracle, autograd, opcheck, backends."""

import numpy as np
import pytest
import torch

from covfast import _backend
from covfast.ops import reference, reverse_attention

SHAPES = [  # (B, C, H, W, h, w)
    (1, 1, 1, 1, 1, 1),
    (2, 3, 7, 13, 4, 5),
    (1, 4, 16, 16, 8, 8),
    (3, 2, 11, 9, 11, 9),
    (1, 2, 5, 6, 9, 10),
]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (1e-2, 2e-3)}


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of 1-D linear upsampling with align_corners=False, by explicit loops."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        weights[i, i0] += 1 - frac
        weights[i, i1] += frac
    return weights


def oracle(x: torch.Tensor, side: torch.Tensor) -> np.ndarray:
    x64, side64 = x.double().numpy(), side.double().numpy()
    rows = bilinear_matrix(x.shape[2], side.shape[2])
    cols = bilinear_matrix(x.shape[3], side.shape[3])
    up = np.einsum("ij,bcjk,lk->bcil", rows, side64, cols)
    return x64 * (1 - 1 / (1 + np.exp(-up)))


def make_inputs(shape, dtype, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    b, c, h_out, w_out, h, w = shape
    x = torch.randn(b, c, h_out, w_out, generator=gen, dtype=torch.float64).to(dtype)
    side = (3 * torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    return x.requires_grad_(requires_grad), side.requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_oracle(shape, dtype):
    x, side = make_inputs(shape, dtype, seed=int(torch.randint(0, 2**31, ())))
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(reverse_attention(x, side).double().numpy(), oracle(x, side), rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_float64(seed):
    x, side = make_inputs((2, 3, 7, 13, 4, 5), torch.float64, seed, requires_grad=True)
    assert torch.autograd.gradcheck(reverse_attention, (x, side))


def test_opcheck():
    x, side = make_inputs((2, 3, 7, 13, 4, 5), torch.float32, seed=3, requires_grad=True)
    torch.library.opcheck(torch.ops.covfast.reverse_attention.default, (x, side))
    grad = torch.randn_like(x)
    torch.library.opcheck(torch.ops.covfast.reverse_attention_backward.default, (grad, x.detach(), side.detach()))


def test_non_contiguous_and_empty():
    x, side = make_inputs((2, 3, 9, 8, 4, 5), torch.float32, seed=4)
    x_t = x.transpose(2, 3)
    side_t = side.transpose(2, 3)
    np.testing.assert_allclose(reverse_attention(x_t, side_t).numpy(), oracle(x_t, side_t), rtol=1e-5, atol=1e-6)
    empty = torch.empty(0, 3, 5, 5)
    assert reverse_attention(empty, torch.empty(0, 1, 2, 2)).shape == (0, 3, 5, 5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="side must be"):
        reverse_attention(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="share dtype"):
        reverse_attention(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 2, 2, dtype=torch.float64))


def test_float16_error_within_twice_reference():
    x, side = make_inputs((2, 4, 24, 20, 12, 10), torch.float32, seed=5)
    exact = torch.from_numpy(oracle(x, side))
    ref_err = (reference.reverse_attention(x.half(), side.half()).double() - exact).abs().max()
    op_err = (reverse_attention(x.half(), side.half()).double() - exact).abs().max()
    assert op_err <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backend_forward_backward(backend):
    if not _backend._probe(backend, "cpu")[0]:
        pytest.skip(_backend._probe(backend, "cpu")[1])
    x, side = make_inputs((2, 3, 7, 13, 4, 5), torch.float32, seed=6)
    out = _backend.implementation("reverse_attention", backend)(x, side)
    np.testing.assert_allclose(out.numpy(), oracle(x, side), rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(x)
    grad_x, grad_side = _backend.implementation("reverse_attention_backward", backend)(grad, x, side)
    ref_x, ref_side = reference.reverse_attention_backward(grad, x, side)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_side, ref_side, rtol=1e-4, atol=1e-5)
