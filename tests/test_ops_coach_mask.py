"""covfast::coach_mask: reference vs a naive float64 numpy oracle (sort-based threshold), autograd, opcheck."""

import numpy as np
import pytest
import torch

from covfast import _backend
from covfast.ops import coach_mask, reference

SHAPES = [(1, 1, 1, 1), (2, 1, 7, 13), (3, 1, 16, 16), (1, 1, 33, 5)]
KEEPS = [0.05, 0.3, 0.5, 1.0]


def oracle(score: torch.Tensor, keep: float, alpha: float) -> np.ndarray:
    s = score.double().numpy()
    out = np.empty_like(s)
    n = s[0].size
    for b in range(s.shape[0]):
        t = np.sort(s[b].ravel())[::-1][reference.coach_k(keep, n) - 1]
        out[b] = 1 / (1 + np.exp(-alpha * (s[b] - t)))
    return out


def make_score(shape, dtype, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    score = torch.randn(shape, generator=gen, dtype=torch.float64)
    if ties:
        score = (score * 2).round() / 2  # few distinct values, many ties at the threshold
    return score.to(dtype)


def test_coach_k():
    assert reference.coach_k(0.3, 100) == 30
    assert reference.coach_k(0.301, 100) == 31
    assert reference.coach_k(1e-9, 10) == 1
    assert reference.coach_k(1.0, 7) == 7


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("ties", [False, True])
def test_reference_matches_oracle(shape, keep, ties):
    score = make_score(shape, torch.float32, int(torch.randint(0, 2**31, ())), ties)
    np.testing.assert_allclose(coach_mask(score, keep, 7.0).double().numpy(), oracle(score, keep, 7.0), atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_threshold_equals_kthvalue(ties):
    score = make_score((4, 1, 9, 11), torch.float32, 7, ties)
    n = 99
    for keep in KEEPS:
        k = reference.coach_k(keep, n)
        expected = score.reshape(4, -1).kthvalue(n - k + 1, dim=1).values
        torch.testing.assert_close(reference.coach_threshold(score, keep), expected, rtol=0, atol=0)


def test_image_variant_and_empty():
    score = make_score((2, 1, 6, 7), torch.float32, 8)
    image = torch.randn(2, 3, 6, 7)
    mask, masked = coach_mask(score, 0.4, 3.0, image=image)
    torch.testing.assert_close(masked, image * mask)
    assert coach_mask(torch.empty(0, 1, 4, 4), 0.5, 1.0).shape == (0, 1, 4, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backward_holds_threshold_constant(seed):
    # gradcheck cannot be used on the whole op: moving the k-th score moves t, which the op treats as a constant.
    score = make_score((2, 1, 7, 13), torch.float64, seed).requires_grad_()
    grad_out = torch.randn(score.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(coach_mask(score, 0.3, 4.0), score, grad_out)
    t = reference.coach_threshold(score.detach(), 0.3).view(-1, 1, 1, 1)
    leaf = score.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.sigmoid(4.0 * (leaf - t)), leaf, grad_out)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_opcheck():
    score = make_score((2, 1, 7, 13), torch.float32, 9).requires_grad_()
    torch.library.opcheck(torch.ops.covfast.coach_mask.default, (score, 0.3, 4.0))


def test_bad_inputs():
    with pytest.raises(ValueError, match="keep"):
        coach_mask(torch.zeros(1, 1, 3, 3), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        coach_mask(torch.zeros(1, 2, 3, 3), 0.5, 1.0)


def skip_unavailable(backend):
    if not _backend._probe(backend, "cpu")[0]:
        pytest.skip(_backend._probe(backend, "cpu")[1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("ties", [False, True])
def test_backend_matches_oracle(backend, ties):
    skip_unavailable(backend)
    score = make_score((3, 1, 7, 13), torch.float32, 10, ties)
    out = _backend.implementation("coach_mask", backend)(score, 0.3, 5.0)
    np.testing.assert_allclose(out.double().numpy(), oracle(score, 0.3, 5.0), atol=1e-6)


# Triton: small shapes only (the CPU interpreter); 45 x 50 spans several blocks and programs per image.
TRITON_SHAPES = [(1, 1, 1, 1), (3, 1, 7, 13), (1, 1, 45, 50)]


def hard_scores(shape, seed):
    """Scores mixing +-0.0, negatives, repeated values and extremes, where a bit-level select can go wrong."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.0, -0.0, -1.5, 1.5, -3e38, 3e38, 1e-40, -1e-40, 2.0, -2.0])
    return pool[torch.randint(0, len(pool), shape, generator=gen)]


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "ties", "hard"])
def test_triton_threshold_equals_kthvalue(shape, dtype, kind):
    skip_unavailable("triton")
    from covfast.kernels.coach_mask import coach_threshold

    seed = int(torch.randint(0, 2**31, ()))
    score = hard_scores(shape, seed) if kind == "hard" else make_score(shape, torch.float32, seed, kind == "ties")
    score = score.to(dtype)
    n = shape[2] * shape[3]
    for keep in KEEPS:
        k = reference.coach_k(keep, n)
        expected = score.reshape(shape[0], -1).kthvalue(n - k + 1, dim=1).values.float()
        torch.testing.assert_close(coach_threshold(score, k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_triton_mask_and_image_product(shape, ties):
    skip_unavailable("triton")
    score = make_score(shape, torch.float32, int(torch.randint(0, 2**31, ())), ties)
    image = torch.randn(shape[0], 3, *shape[2:])
    with _backend.forced("triton"):
        assert _backend.select("coach_mask", "cpu") == "triton"
        mask, masked = coach_mask(score, 0.3, 5.0, image=image)
    np.testing.assert_allclose(mask.double().numpy(), oracle(score, 0.3, 5.0), atol=1e-6)
    torch.testing.assert_close(masked, image * mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_error_within_twice_reference(dtype):
    skip_unavailable("triton")
    score = make_score((2, 1, 21, 17), torch.float32, 16)
    exact = reference.coach_mask(score.to(dtype).float(), 0.3, 5.0)
    ref_err = (reference.coach_mask(score.to(dtype), 0.3, 5.0).float() - exact).abs().max()
    triton_mask = _backend.implementation("coach_mask", "triton")(score.to(dtype), 0.3, 5.0)
    assert triton_mask.dtype == dtype
    assert (triton_mask.float() - exact).abs().max() <= 2 * ref_err + 1e-6


def test_triton_backward_and_empty():
    skip_unavailable("triton")
    score = make_score((2, 1, 7, 13), torch.float32, 17).requires_grad_()
    grad_out = torch.randn(score.shape)
    with _backend.forced("triton"):
        (grad,) = torch.autograd.grad(coach_mask(score, 0.3, 4.0), score, grad_out)
        empty = coach_mask(torch.empty(0, 1, 4, 4), 0.5, 1.0)
    (expected,) = torch.autograd.grad(coach_mask(score, 0.3, 4.0), score, grad_out)
    torch.testing.assert_close(grad, expected)
    assert empty.shape == (0, 1, 4, 4)


def _cpp_threshold(score: torch.Tensor, k: int) -> torch.Tensor:
    """The C++ kernel's per-image threshold for ``k`` kept pixels."""
    from covfast.ops.coach import cpp_threshold

    n = score.shape[2] * score.shape[3]
    keep = k / n
    assert reference.coach_k(keep, n) == k
    return cpp_threshold(score, keep)


CPP_SHAPES = [(1, 1, 1, 1), (3, 1, 7, 13), (2, 1, 45, 50), (1, 1, 352, 352)]


@pytest.mark.parametrize("shape", CPP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "hard", "nan"])
def test_cpp_threshold_equals_kthvalue(shape, dtype, kind):
    skip_unavailable("cpp")
    seed = int(torch.randint(0, 2**31, ()))
    score = hard_scores(shape, seed) if kind == "hard" else make_score(shape, torch.float32, seed, kind == "ties")
    score = score.to(dtype)
    if kind == "nan":  # torch.kthvalue counts NaN as the largest value; so does the kernel
        score.view(-1)[torch.randperm(score.numel(), generator=torch.Generator().manual_seed(seed))[:3]] = float("nan")
    n = shape[2] * shape[3]
    for keep in KEEPS:
        k = reference.coach_k(keep, n)
        expected = score.reshape(shape[0], -1).kthvalue(n - k + 1, dim=1).values
        torch.testing.assert_close(_cpp_threshold(score, k), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", CPP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_cpp_mask_matches_oracle(shape, dtype, ties):
    skip_unavailable("cpp")
    score = make_score(shape, dtype, int(torch.randint(0, 2**31, ())), ties)
    out = _backend.implementation("coach_mask", "cpp")(score, 0.3, 5.0)
    assert out.dtype == dtype and out.shape == score.shape
    np.testing.assert_allclose(out.double().numpy(), oracle(score, 0.3, 5.0), atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_cpp_non_contiguous_low_precision_and_autograd():
    skip_unavailable("cpp")
    base = make_score((2, 1, 13, 22), torch.float32, 21)
    score = base[..., ::2]  # non-contiguous [2, 1, 13, 11]
    assert not score.is_contiguous()
    with _backend.forced("cpp"):
        assert _backend.select("coach_mask", "cpu") == "cpp"
        mask = coach_mask(score, 0.3, 5.0)
        half = coach_mask(score.half(), 0.3, 5.0)  # not a C++ type: the reference runs
        leaf = score.clone().requires_grad_()
        (grad,) = torch.autograd.grad(coach_mask(leaf, 0.3, 4.0), leaf, torch.ones_like(leaf))
    np.testing.assert_allclose(mask.double().numpy(), oracle(score.contiguous(), 0.3, 5.0), atol=1e-6)
    torch.testing.assert_close(half, reference.coach_mask(score.half(), 0.3, 5.0))
    t = reference.coach_threshold(score, 0.3).view(-1, 1, 1, 1)  # the backward holds the threshold constant
    ref_leaf = score.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.sigmoid(4.0 * (ref_leaf - t)), ref_leaf, torch.ones_like(ref_leaf))
    torch.testing.assert_close(grad, expected)
