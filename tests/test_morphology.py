"""The lung mask's morphology: torch's pools give exactly scipy's filters (covfast/pipeline/morphology.py)."""

import numpy as np
import pytest
import torch

from covfast.pipeline import lung, morphology

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _blobs(seed: int, shape=(4, 37, 45)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.08
    mask[:, 10:20, 5:30] = True  # a solid region, so closings and erosions have something to keep
    mask[:, 0, :] = True  # touching the border: the padding rules matter
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_filters_equal_scipy(device, seed):
    mask = _blobs(seed)
    sizes = lung._round_element(6.3, 4.8)
    assert len(set(sizes)) > 1
    np.testing.assert_array_equal(morphology.union_dilation(mask, sizes, device), morphology.union_dilation(mask, sizes))
    closed = morphology.union_closing(mask, sizes, device)
    assert closed.dtype == bool
    np.testing.assert_array_equal(closed, morphology.union_closing(mask, sizes))
    for size in [(1, 9, 5), (1, 1, 7), (1, 3, 1)]:
        np.testing.assert_array_equal(morphology.max_filter(mask, size, device), morphology.max_filter(mask, size))
    labels = (mask * np.random.default_rng(seed).integers(1, 3, mask.shape)).astype(np.uint8)
    np.testing.assert_array_equal(morphology.cross_dilation(labels, device), morphology.cross_dilation(labels))


@pytest.mark.parametrize("device", DEVICES)
def test_lung_mask_identical_on_torch(monkeypatch, device):
    """The whole lung mask of the shipped sample with torch's filters equals scipy's, voxel for voxel."""
    from covfast.io import load_volume, sample_path

    volume = load_volume(str(sample_path()))
    expected = lung.lung_mask(volume.hu, volume.spacing_mm)
    monkeypatch.setattr(lung, "_morphology_backend", lambda _: device)
    got = lung.lung_mask(volume.hu, volume.spacing_mm, device=device)
    assert (expected > 0).sum() > 1000
    np.testing.assert_array_equal(got, expected)


def test_resting_on_counts_the_lower_surface_over_the_slice_below():
    from covfast.pipeline.morphology import resting_on

    labels = np.zeros((3, 4, 6), np.int32)
    labels[1:, 0:2, 0:2] = 1  # lower surface 4 voxels in slice 1, all over `below`
    labels[1, 2:4, 2:6] = 2  # lower surface 8 voxels, 4 of them over `below`
    below = np.zeros(labels.shape, bool)
    below[0, 0:2, 0:2] = True
    below[0, 2:4, 2:4] = True
    np.testing.assert_array_equal(resting_on(labels, below, 0.6), [False, True, False])
    np.testing.assert_array_equal(resting_on(labels, below, 0.4), [False, True, True])
    np.testing.assert_array_equal(resting_on(labels[1:2], below[1:2], 0.0), [False, False, False])  # no slice below


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resting_on_from_the_voxel_list_equals_the_whole_array(seed):
    import cc3d

    from covfast.pipeline.morphology import resting_on

    rng = np.random.default_rng(seed)
    labels = cc3d.connected_components(rng.random((6, 30, 40)) < 0.08, connectivity=26)
    below = rng.random(labels.shape) < 0.5
    expected = resting_on(labels, below, 0.5)
    assert expected.any() and not expected.all()  # the data leave both answers possible
    np.testing.assert_array_equal(resting_on(labels, below, 0.5, np.nonzero(labels)), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_fill_holes_per_slice_equals_scipy_slice_by_slice(seed):
    from scipy import ndimage as ndi

    mask = _blobs(seed)
    mask[1] = False  # an empty slice
    mask[2, 20:30, 30:40] = True
    mask[2, 23:27, 33:37] = False  # a hole well inside a solid square
    expected = np.stack([ndi.binary_fill_holes(s) for s in mask])
    assert (expected & ~mask).sum() >= 16  # holes exist to fill
    np.testing.assert_array_equal(lung.fill_holes_per_slice(mask), expected)
