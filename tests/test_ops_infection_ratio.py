"""covfast::infection_ratio: every backend vs a naive float64 numpy oracle, on odd, empty and strided volumes."""

import numpy as np
import pytest
import torch

from covfast import _backend
from covfast.ops import infection_ratio, infection_totals
from covfast.ops.infection import float32_threshold

CPU_BACKENDS = ["reference", "cpp", "triton"]
SHAPES = [(1, 1, 1), (2, 7, 13), (3, 17, 100), (5, 1, 33), (2, 40, 300)]
PROB_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def oracle(lung: torch.Tensor, infection: torch.Tensor, threshold: float):
    """Loops over the lung labels and classes with numpy masks, all in float64 / int64."""
    lung_np = lung.numpy().astype(np.int64)
    is_classes = infection.dtype == torch.uint8
    values = infection.to(torch.float64).numpy()
    classes = values.astype(np.int64) if is_classes else (values > threshold).astype(np.int64)
    soft = (values != 0).astype(np.float64) if is_classes else values
    depth = lung.shape[0]
    lung_voxels = np.zeros((depth, 2), np.int64)
    infected = np.zeros((depth, 2, 2), np.int64)
    soft_sum = np.zeros((depth, 2), np.float64)
    for d in range(depth):
        for side in range(2):
            inside = lung_np[d] == side + 1
            lung_voxels[d, side] = inside.sum()
            soft_sum[d, side] = soft[d][inside].sum(dtype=np.float64)
            for cls in range(2):
                infected[d, side, cls] = (inside & (classes[d] == cls + 1)).sum()
    return lung_voxels, infected, soft_sum


def make_volume(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lung = torch.randint(0, 4, shape, generator=gen, dtype=torch.uint8)  # 3 is an unknown label and must not count
    if dtype == torch.uint8:
        return lung, torch.randint(0, 3, shape, generator=gen, dtype=torch.uint8)
    prob = torch.rand(shape, generator=gen, dtype=torch.float64)
    prob[..., ::5] = 0.5  # values on the threshold test the strict comparison
    return lung, prob.to(dtype)


def run(backend, lung, infection, threshold):
    if not _backend._probe(backend, "cpu")[0]:
        pytest.skip(_backend._probe(backend, "cpu")[1])
    return _backend.implementation("infection_ratio", backend)(lung, infection, threshold)


def assert_matches_oracle(result, lung, infection, threshold):
    expected = oracle(lung, infection, threshold)
    assert result[0].dtype == torch.int64 and result[1].dtype == torch.int64 and result[2].dtype == torch.float64
    np.testing.assert_array_equal(result[0].numpy(), expected[0])
    np.testing.assert_array_equal(result[1].numpy(), expected[1])
    np.testing.assert_allclose(result[2].numpy(), expected[2], rtol=1e-6, atol=1e-6)


def backend_shapes(backend):
    # Triton runs in its CPU interpreter here: keep its volumes small.
    return SHAPES[:3] if backend == "triton" else SHAPES


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [*PROB_DTYPES, torch.uint8])
def test_matches_oracle(backend, dtype):
    for shape in backend_shapes(backend):
        seed = int(torch.randint(0, 2**31, ()))
        lung, infection = make_volume(shape, dtype, seed)
        assert_matches_oracle(run(backend, lung, infection, 0.5), lung, infection, 0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous(backend):
    lung, infection = make_volume((3, 21, 30), torch.float32, seed=1)
    views = [
        (lung.transpose(1, 2), infection.transpose(1, 2)),
        (lung[:, ::2, 1::3], infection[:, ::2, 1::3]),
        (lung.permute(2, 0, 1), infection.permute(2, 0, 1)),
    ]
    for lung_view, infection_view in views:
        assert_matches_oracle(run(backend, lung_view, infection_view, 0.3), lung_view, infection_view, 0.3)
    classes = (infection * 3).clamp(max=2).to(torch.uint8)
    assert_matches_oracle(
        run(backend, lung.transpose(1, 2), classes.transpose(1, 2), 0.5),
        lung.transpose(1, 2),
        classes.transpose(1, 2),
        0.5,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 5), (2, 5, 0)])
def test_empty(backend, shape):
    lung, infection = torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape)
    lung_voxels, infected, soft = run(backend, lung, infection, 0.5)
    assert lung_voxels.shape == (shape[0], 2) and infected.shape == (shape[0], 2, 2) and soft.shape == (shape[0], 2)
    assert int(lung_voxels.sum()) == 0 and int(infected.sum()) == 0 and float(soft.sum()) == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_class_value_raises(backend):
    lung = torch.ones(2, 5, 40, dtype=torch.uint8)
    classes = torch.zeros_like(lung)
    classes[1, 3, 37] = 3  # in the vector loop's tail for width 40, and outside any lung elsewhere
    with pytest.raises(ValueError, match="0, 1 or 2"):
        run(backend, lung, classes, 0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threshold_is_strict_and_exact(backend):
    # 0.3 is not a float32: the float32 0.3 rounds up, so p = float32(0.3) is > 0.3 while its predecessor is not.
    above = np.float32(0.3)
    below = np.nextafter(above, np.float32(0))
    prob = torch.tensor([[[above, below, 0.3, 0.31]]], dtype=torch.float32)
    lung = torch.tensor([[[1, 1, 2, 2]]], dtype=torch.uint8)
    _, infected, _ = run(backend, lung, prob, 0.3)
    assert infected[0, :, 0].tolist() == [1, 2]
    assert float32_threshold(0.5) == 0.5 and float32_threshold(0.3) < 0.3


def test_public_op_totals_and_opcheck():
    lung, infection = make_volume((4, 9, 11), torch.float32, seed=2)
    result = infection_ratio(lung, infection, 0.4)
    assert_matches_oracle(result, lung, infection, 0.4)
    lung_total, infected_total, soft_total = infection_totals(*result)
    expected = oracle(lung, infection, 0.4)
    np.testing.assert_array_equal(lung_total.numpy(), expected[0].sum(0))
    np.testing.assert_array_equal(infected_total.numpy(), expected[1].sum(0))
    np.testing.assert_allclose(soft_total.numpy(), expected[2].sum(0), rtol=1e-9)
    torch.library.opcheck(torch.ops.covfast.infection_ratio.default, (lung, infection, 0.4))
    classes = (infection * 3).clamp(max=2).to(torch.uint8)
    torch.library.opcheck(torch.ops.covfast.infection_ratio.default, (lung, classes, 0.5))


def test_bad_inputs():
    lung = torch.zeros(2, 3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same"):
        infection_ratio(lung, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="uint8 labels"):
        infection_ratio(lung.float(), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="probabilities or uint8"):
        infection_ratio(lung, torch.zeros(2, 3, 4, dtype=torch.int32))


def test_real_mosmed_mask():
    """A real MosMed infection mask with a synthetic lung (the CT images are not released): class counts match."""
    nibabel = pytest.importorskip("nibabel")
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared/data/mosmed-masks/masks/study_0255_mask.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    mask = np.asarray(nibabel.load(path).dataobj).astype(np.uint8).transpose(2, 0, 1)  # [D, H, W]
    infection = torch.from_numpy(np.ascontiguousarray(mask))
    lung = torch.zeros_like(infection)
    lung[:, :, : lung.shape[2] // 2] = 1
    lung[:, :, lung.shape[2] // 2 :] = 2
    for backend in ["reference", "cpp"]:
        assert_matches_oracle(run(backend, lung, infection, 0.5), lung, infection, 0.5)
    assert int(infection_ratio(lung, infection)[1].sum()) == int(mask.sum()) > 0
