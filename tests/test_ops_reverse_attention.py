"""covfast::reverse_attention: reference vs a naive float64 numpy oracle, autograd, opcheck, backends."""

import numpy as np
import pytest
import torch

from covfast import _backend
from covfast.ops import reference, reverse_attention, reverse_attention_concat

SHAPES = [  # (B, C, H, W, h, w)
    (1, 1, 1, 1, 1, 1),
    (2, 3, 7, 13, 4, 5),
    (1, 4, 16, 16, 8, 8),
    (3, 2, 11, 9, 11, 9),
    (1, 2, 5, 6, 9, 10),
]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 2e-3)}


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


CONCAT_SHAPES = [  # (B, C1, C2, H, W, he, we, h, w)
    (1, 1, 1, 1, 1, 1, 1, 1, 1),
    (2, 3, 2, 7, 13, 28, 52, 4, 5),
    (1, 4, 3, 8, 8, 64, 64, 32, 32),  # the model's deepest stage: edge and side shrink to the features' size
    (3, 2, 1, 11, 9, 11, 9, 11, 9),
    (1, 2, 4, 5, 6, 9, 10, 3, 2),
    (2, 3, 0, 6, 5, 4, 4, 3, 3),
]


def concat_oracle(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> np.ndarray:
    rows = bilinear_matrix(x.shape[2], edge.shape[2])
    cols = bilinear_matrix(x.shape[3], edge.shape[3])
    edge_up = np.einsum("ij,bcjk,lk->bcil", rows, edge.double().numpy(), cols)
    gated = torch.from_numpy(np.concatenate([x.double().numpy(), edge_up], axis=1))
    return oracle(gated, side.double())


def make_concat_inputs(shape, dtype, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    b, c1, c2, h_out, w_out, he, we, h, w = shape
    x = torch.randn(b, c1, h_out, w_out, generator=gen, dtype=torch.float64).to(dtype)
    edge = torch.randn(b, c2, he, we, generator=gen, dtype=torch.float64).to(dtype)
    side = (3 * torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (x, edge, side))


@pytest.mark.parametrize("shape", CONCAT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_concat_matches_oracle(shape, dtype):
    x, edge, side = make_concat_inputs(shape, dtype, seed=int(torch.randint(0, 2**31, ())))
    rtol, atol = TOL[dtype]
    out = reverse_attention_concat(x, edge, side)
    np.testing.assert_allclose(out.double().numpy(), concat_oracle(x, edge, side), rtol=rtol, atol=atol)


def test_concat_equals_unfused_model_path():
    x, edge, side = make_concat_inputs((2, 3, 2, 16, 16, 64, 64, 8, 8), torch.float32, seed=11)
    edge_up = torch.nn.functional.interpolate(edge, size=(16, 16), mode="bilinear", align_corners=False)
    unfused = reverse_attention(torch.cat([x, edge_up], dim=1), side)
    torch.testing.assert_close(reverse_attention_concat(x, edge, side), unfused, rtol=1e-6, atol=1e-6)


# small enough for numerical Jacobians; the edge is shrunk along H and enlarged along W (and the reverse)
GRAD_SHAPES = [(2, 3, 2, 7, 13, 9, 11, 4, 5), (1, 2, 3, 5, 6, 3, 10, 3, 2)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_concat_gradcheck_float64(seed, shape):
    inputs = make_concat_inputs(shape, torch.float64, seed, requires_grad=True)
    assert torch.autograd.gradcheck(reverse_attention_concat, inputs)


def test_concat_opcheck():
    x, edge, side = make_concat_inputs(CONCAT_SHAPES[1], torch.float32, seed=12, requires_grad=True)
    torch.library.opcheck(torch.ops.covfast.reverse_attention_concat.default, (x, edge, side))
    grad = torch.randn(2, 5, 7, 13)
    torch.library.opcheck(
        torch.ops.covfast.reverse_attention_concat_backward.default, (grad, x.detach(), edge.detach(), side.detach())
    )


def test_concat_non_contiguous_and_empty():
    x, edge, side = make_concat_inputs((2, 3, 2, 9, 8, 10, 12, 4, 5), torch.float32, seed=13)
    x_t, edge_t, side_t = x.transpose(2, 3), edge.transpose(2, 3), side.transpose(2, 3)
    out = reverse_attention_concat(x_t, edge_t, side_t)
    np.testing.assert_allclose(out.numpy(), concat_oracle(x_t, edge_t, side_t), rtol=1e-5, atol=1e-6)
    channels_last = reverse_attention_concat(x.to(memory_format=torch.channels_last), edge[:, ::2], side)
    np.testing.assert_allclose(channels_last.numpy(), concat_oracle(x, edge[:, ::2], side), rtol=1e-5, atol=1e-6)
    out = reverse_attention_concat(torch.empty(0, 3, 5, 5), torch.empty(0, 2, 4, 4), torch.empty(0, 1, 2, 2))
    assert out.shape == (0, 5, 5, 5)


def test_concat_bad_shapes():
    x, side = torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="edge must be"):
        reverse_attention_concat(x, torch.zeros(1, 2, 4, 4), side)
    with pytest.raises(ValueError, match="share dtype"):
        reverse_attention_concat(x, torch.zeros(2, 2, 4, 4, dtype=torch.float64), side)
    with pytest.raises(ValueError, match="empty in space"):
        reverse_attention_concat(x, torch.zeros(2, 2, 0, 4), side)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concat_low_precision_error_within_twice_reference(dtype):
    x, edge, side = make_concat_inputs((2, 4, 3, 24, 20, 48, 40, 12, 10), torch.float32, seed=14)
    exact = torch.from_numpy(concat_oracle(x, edge, side))
    low = (x.to(dtype), edge.to(dtype), side.to(dtype))
    ref_err = (reference.reverse_attention_concat(*low).double() - exact).abs().max()
    op_err = (reverse_attention_concat(*low).double() - exact).abs().max()
    assert reverse_attention_concat(*low).dtype == dtype
    assert op_err <= 2 * ref_err + 1e-6


needs_cpp = pytest.mark.skipif(not _backend._probe("cpp", "cpu")[0], reason="covfast._C is not built")


@needs_cpp
def test_cpp_is_the_automatic_choice_for_the_fused_op():
    with _backend.forced(None):
        assert _backend.select("reverse_attention_concat", "cpu") == "cpp"
        assert _backend.select("reverse_attention_concat_backward", "cpu") == "cpp"
        assert _backend.select("reverse_attention_backward", "cpu") == "cpp"


@needs_cpp
@pytest.mark.parametrize("shape", CONCAT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_concat_forward_backward(shape, dtype):
    x, edge, side = make_concat_inputs(shape, dtype, seed=int(torch.randint(0, 2**31, ())))
    grad = torch.randn(shape[0], shape[1] + shape[2], *shape[3:5], dtype=dtype)
    rtol, atol = TOL[dtype]
    with _backend.forced("cpp"):
        assert _backend.select("reverse_attention_concat", "cpu") == "cpp"
        out = reverse_attention_concat(x, edge, side)
        grads = torch.ops.covfast.reverse_attention_concat_backward(grad, x, edge, side)
    np.testing.assert_allclose(out.double().numpy(), concat_oracle(x, edge, side), rtol=rtol, atol=atol)
    for got, expected in zip(grads, reference.reverse_attention_concat_backward(grad, x, edge, side)):
        torch.testing.assert_close(got, expected, rtol=10 * rtol, atol=10 * atol)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_plain_backward(shape):
    x, side = make_inputs(shape, torch.float32, seed=int(torch.randint(0, 2**31, ())))
    grad = torch.randn_like(x)
    with _backend.forced("cpp"):
        assert _backend.select("reverse_attention_backward", "cpu") == "cpp"
        grad_x, grad_side = torch.ops.covfast.reverse_attention_backward(grad, x, side)
    ref_x, ref_side = reference.reverse_attention_backward(grad, x, side)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_side, ref_side, rtol=1e-4, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpp_gradcheck_float64(seed):
    inputs = make_concat_inputs(GRAD_SHAPES[seed % 2], torch.float64, seed, requires_grad=True)
    plain = make_inputs(SHAPES[1], torch.float64, seed, requires_grad=True)
    with _backend.forced("cpp"):
        assert torch.autograd.gradcheck(reverse_attention_concat, inputs)
        assert torch.autograd.gradcheck(reverse_attention, plain)


@needs_cpp
def test_cpp_opcheck_non_contiguous_empty_and_half():
    x, edge, side = make_concat_inputs((2, 3, 2, 9, 8, 10, 12, 4, 5), torch.float32, seed=15, requires_grad=True)
    x_t, edge_t, side_t = (t.detach().transpose(2, 3) for t in (x, edge, side))
    with _backend.forced("cpp"):
        torch.library.opcheck(torch.ops.covfast.reverse_attention_concat.default, (x, edge, side))
        out = reverse_attention_concat(x_t, edge_t, side_t)
        empty = reverse_attention_concat(torch.empty(2, 3, 0, 5), torch.empty(2, 2, 4, 4), torch.empty(2, 1, 2, 2))
        half = reverse_attention_concat(*(t.detach().half() for t in (x, edge, side)))
    np.testing.assert_allclose(out.numpy(), concat_oracle(x_t, edge_t, side_t), rtol=1e-5, atol=1e-6)
    assert empty.shape == (2, 5, 0, 5)
    torch.testing.assert_close(half, reference.reverse_attention_concat(*(t.detach().half() for t in (x, edge, side))))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [*CONCAT_SHAPES, (8, 64, 32, 32, 32, 64, 64, 16, 16)])
def test_cuda_concat_forward_backward(shape):
    x, edge, side = (t.cuda() for t in make_concat_inputs(shape, torch.float32, seed=int(torch.randint(0, 2**31, ()))))
    grad = torch.randn(shape[0], shape[1] + shape[2], *shape[3:5], device="cuda")
    with _backend.forced("cuda"):
        assert _backend.select("reverse_attention_concat", "cuda") == "cuda"
        out = reverse_attention_concat(x, edge, side)
        grads = torch.ops.covfast.reverse_attention_concat_backward(grad, x, edge, side)
    torch.testing.assert_close(out, reference.reverse_attention_concat(x, edge, side))
    for got, expected in zip(grads, reference.reverse_attention_concat_backward(grad, x, edge, side)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_concat_low_precision(dtype):
    x, edge, side = (t.cuda() for t in make_concat_inputs((2, 4, 3, 24, 20, 48, 40, 12, 10), torch.float32, seed=18))
    exact = reference.reverse_attention_concat(x.double(), edge.double(), side.double())
    low = (x.to(dtype), edge.to(dtype), side.to(dtype))
    ref_err = (reference.reverse_attention_concat(*low).double() - exact).abs().max()
    impl = _backend.implementation("reverse_attention_concat", "cuda")
    assert (impl(*low).double() - exact).abs().max() <= 2 * ref_err + 1e-6


@pytest.mark.cuda
def test_cuda_concat_non_contiguous_empty_opcheck_and_compile():
    x, edge, side = (t.cuda() for t in make_concat_inputs((2, 3, 2, 9, 8, 10, 12, 4, 5), torch.float32, seed=19))
    x_t, edge_t, side_t = x.transpose(2, 3), edge.transpose(2, 3), side.transpose(2, 3)
    with _backend.forced("cuda"):
        torch.testing.assert_close(
            reverse_attention_concat(x_t, edge_t, side_t), reference.reverse_attention_concat(x_t, edge_t, side_t)
        )
        empty = reverse_attention_concat(
            *(torch.empty(s, device="cuda") for s in ((0, 3, 5, 5), (0, 2, 4, 4), (0, 1, 2, 2)))
        )
        assert empty.shape == (0, 5, 5, 5)
        inputs = tuple(t.requires_grad_() for t in (x, edge, side))
        torch.library.opcheck(torch.ops.covfast.reverse_attention_concat.default, inputs)
        compiled = torch.compile(reverse_attention_concat, fullgraph=True)
        torch.testing.assert_close(compiled(*inputs), reference.reverse_attention_concat(*inputs))
