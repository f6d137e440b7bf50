"""Tests of the lung-mask stage (covfast.pipeline.lung): a synthetic chest phantom, the input contract,
and a real CT series when ../shared/data is present."""

import time
from pathlib import Path

import numpy as np
import pytest

from covfast.pipeline.lung import LEFT_LUNG, RIGHT_LUNG, lung_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _chest_phantom(pixel_mm: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A 96 x 150 x 180 mm chest: body, two lungs with lesions, trachea and bronchi, bowel gas, a table.

    Args:
        pixel_mm: in-plane spacing; slices are 2 mm.
        seed: seed of the +-15 HU Gaussian noise.

    Returns:
        "hu" [D, H, W] int16 and bool [D, H, W] masks "right", "left" (true lungs), "consolidation",
        "ggo", "trachea", "outside", "table", "bowel_gas"; "spacing" (d, h, w).
    """
    spacing = (2.0, pixel_mm, pixel_mm)
    z, y, x = np.meshgrid(
        (np.arange(48) + 0.5) * spacing[0],
        (np.arange(round(150 / pixel_mm)) + 0.5) * pixel_mm - 75.0,
        (np.arange(round(180 / pixel_mm)) + 0.5) * pixel_mm - 90.0,
        indexing="ij",
    )
    body = (y / 55.0) ** 2 + (x / 72.0) ** 2 <= 1.0
    table = (y > 62.0) & (y < 70.0) & (np.abs(x) < 80.0)
    # Right lung at low W (negative x), left lung at high W; both reach the lateral chest wall at |x| = 64.
    right = ((z - 50.0) / 34.0) ** 2 + ((y + 2.0) / 38.0) ** 2 + ((x + 38.0) / 26.0) ** 2 <= 1.0
    left = ((z - 50.0) / 34.0) ** 2 + ((y + 2.0) / 38.0) ** 2 + ((x - 38.0) / 26.0) ** 2 <= 1.0
    # The trachea runs down to the carina, where horizontal main bronchi open into both lungs; the slices
    # holding the bronchi are bronchus territory, so the truth's trachea is the tube above them.
    airway = (z > 64.0) & ((y + 15.0) ** 2 + x**2 <= 7.0**2)
    bronchi = (np.abs(z - 68.0) <= 3.5) & ((y + 15.0) ** 2 <= 3.5**2) & (np.abs(x) <= 24.0)
    trachea = airway & (z > 72.0)
    # Dependent consolidation against the right posterolateral chest wall, ground glass inside the left lung.
    consolidation = right & ((z - 50.0) ** 2 + (y - 25.0) ** 2 + (x + 56.0) ** 2 <= 10.0**2)
    ggo = left & ((z - 40.0) ** 2 + (y - 10.0) ** 2 + (x - 40.0) ** 2 <= 8.0**2)
    bowel_gas = (z - 6.0) ** 2 + (y + 10.0) ** 2 + (x - 20.0) ** 2 <= 8.0**2
    hu = np.full(z.shape, -1000.0, dtype=np.float32)
    hu[table] = 150.0
    hu[body] = 40.0
    hu[right | left] = -850.0
    hu[airway | bronchi | bowel_gas] = -1000.0
    hu[consolidation] = 30.0
    hu[ggo] = -500.0
    hu += np.random.default_rng(seed).normal(0.0, 15.0, hu.shape).astype(np.float32)
    return {
        "hu": np.clip(hu, -1024, 3071).astype(np.int16), "spacing": spacing, "right": right, "left": left,
        "consolidation": consolidation, "ggo": ggo, "trachea": trachea, "outside": ~body & ~table,
        "table": table, "bowel_gas": bowel_gas,
    }


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module", params=[1.25, 0.625], ids=["full-grid", "subsampled"])
def phantom(request):
    chest = _chest_phantom(request.param)
    chest["labels"] = lung_mask(chest["hu"], chest["spacing"])
    return chest


def test_phantom_lungs_match_truth(phantom):
    labels = phantom["labels"]
    assert labels.dtype == np.uint8 and labels.shape == phantom["hu"].shape
    assert set(np.unique(labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
    assert _dice(labels == RIGHT_LUNG, phantom["right"]) > 0.95
    assert _dice(labels == LEFT_LUNG, phantom["left"]) > 0.95
    columns = np.arange(labels.shape[2])
    right_w = columns[np.nonzero(labels == RIGHT_LUNG)[2]].mean()
    left_w = columns[np.nonzero(labels == LEFT_LUNG)[2]].mean()
    assert right_w < labels.shape[2] / 2 < left_w


def test_phantom_dense_lung_is_inside(phantom):
    labels = phantom["labels"]
    # The blob's outermost voxel layer lies past the hull chord spanned by the aerated lung around it
    # (the ellipsoid bulges about 1 mm beyond it); the rest of the blob, about 3/4 of it, must be recovered.
    assert (labels[phantom["consolidation"]] == RIGHT_LUNG).mean() > 0.7
    assert (labels[phantom["ggo"]] == LEFT_LUNG).mean() > 0.95


@pytest.mark.parametrize("structure", ["trachea", "outside", "table", "bowel_gas"])
def test_phantom_excludes_non_lung_air(phantom, structure):
    assert not phantom["labels"][phantom[structure]].any()


def test_float_input_gives_the_same_labels():
    chest = _chest_phantom(1.25, seed=1)
    from_int = lung_mask(chest["hu"], chest["spacing"])
    from_float = lung_mask(chest["hu"].astype(np.float32), chest["spacing"])
    from_strided = lung_mask(chest["hu"][:, ::-1, :][:, ::-1, :], chest["spacing"])
    np.testing.assert_array_equal(from_int, from_float)
    np.testing.assert_array_equal(from_int, from_strided)


@pytest.mark.parametrize("cut", [3, 8])
def test_lungs_cut_by_a_narrow_field_of_view_are_kept(cut):
    """A field of view narrower than the chest: both lungs reach the image's left and right edges. Their air touches
    the border like the air around the body, but lies inside the body's outline, is thick and holds vessels, so it
    stays lung (before session 20 both lungs were dropped). The outside air, the table and the bowel gas stay out."""
    chest = _chest_phantom(1.25)
    hu = chest["hu"].copy()
    vessels = np.zeros(hu.shape, bool)
    vessels[:, 3::6, 3::6] = True  # 1-voxel vessels every 7.5 mm: the real lungs' holes
    hu[vessels & (chest["right"] | chest["left"])] = 40
    full = lung_mask(hu, chest["spacing"])
    columns = np.flatnonzero(full.any(axis=(0, 1)))
    crop = (slice(None), slice(None), slice(columns[0] + cut, columns[-1] - cut))
    labels = lung_mask(np.ascontiguousarray(hu[crop]), chest["spacing"])
    assert labels[:, :, 0].any() and labels[:, :, -1].any()  # the lungs do reach both edges
    for side in (RIGHT_LUNG, LEFT_LUNG):
        assert _dice(labels == side, full[crop] == side) > 0.95
    for structure in ("table", "bowel_gas"):
        assert not labels[chest[structure][crop]].any()
    # A few voxels of the air in front of the chest, where the cut chest wall meets the image's edge, may be closed
    # into the mask (12 at cut 3): under 0.1 % of the lungs.
    assert np.count_nonzero(labels[chest["outside"][crop]]) < 1e-3 * np.count_nonzero(labels)


def test_complete_scans_never_look_for_cut_lungs(monkeypatch):
    """With both lungs found at a plausible size, the cut-lung rescue (and its cost) is skipped."""
    from covfast.io import load_volume, sample_path
    from covfast.pipeline import lung as lung_module

    volume = load_volume(sample_path())  # a real chest (the phantom's lungs are too small to count as a pair)

    def refuse(*args, **kwargs):
        raise AssertionError("the cut-lung rescue ran on a complete scan")

    monkeypatch.setattr(lung_module, "_cut_lungs", refuse)
    labels = lung_mask(volume.hu, volume.spacing_mm)
    assert (labels == RIGHT_LUNG).any() and (labels == LEFT_LUNG).any()


def test_one_core_gives_the_same_labels(phantom, monkeypatch):
    """The two lungs' dense-lung recovery runs in two threads where there are cores; on one core it runs in turn."""
    from covfast.pipeline import lung as lung_module

    monkeypatch.setattr(lung_module.os, "cpu_count", lambda: 1)
    np.testing.assert_array_equal(lung_mask(phantom["hu"], phantom["spacing"]), phantom["labels"])


@pytest.mark.parametrize("kept", ["right", "left"])
def test_one_lung_gets_the_label_of_its_side(kept):
    """After a pneumonectomy (the other lung filled with soft tissue) the remaining lung keeps one label, by the side
    of the image it lies on."""
    chest = _chest_phantom(1.25, seed=3)
    hu = chest["hu"].copy()
    hu[chest["left" if kept == "right" else "right"]] = 40
    labels = lung_mask(hu, chest["spacing"])
    expected = RIGHT_LUNG if kept == "right" else LEFT_LUNG
    assert set(np.unique(labels)) == {0, expected}
    assert _dice(labels == expected, chest[kept]) > 0.95


def test_a_single_lung_is_sided_by_the_image_centre_not_its_box():
    from covfast.pipeline.lung import _split_joined_lungs

    lung = np.zeros((4, 30, 100), dtype=bool)
    lung[:, 5:25, 10:20] = True
    assert set(np.unique(_split_joined_lungs(lung))) == {0, RIGHT_LUNG}
    # The same lung in a box of the image whose centre column lies left of it: the box's own centre (50) is not used.
    assert set(np.unique(_split_joined_lungs(lung, image_centre_w=5.0))) == {0, LEFT_LUNG}


@pytest.mark.parametrize("fill_hu", [40, -1000])
def test_volume_without_lungs_is_all_zero(fill_hu):
    hu = np.full((20, 64, 64), fill_hu, dtype=np.int16)
    labels = lung_mask(hu, (2.0, 1.0, 1.0))
    assert labels.dtype == np.uint8 and labels.shape == hu.shape and not labels.any()


@pytest.mark.parametrize("shape", [(0, 64, 64), (1, 1, 1), (1, 5, 5), (3, 2, 7), (2, 1, 1), (5, 3, 3)])
def test_tiny_volumes_do_not_crash(shape):
    hu = np.full(shape, -900, dtype=np.int16)
    labels = lung_mask(hu, (2.0, 0.7, 0.7))
    assert labels.shape == shape and labels.dtype == np.uint8 and not labels.any()


def test_nan_voxels_are_not_lung():
    chest = _chest_phantom(1.25, seed=2)
    hu = chest["hu"].astype(np.float32)
    hu[:, :, :8] = np.nan
    labels = lung_mask(hu, chest["spacing"])
    assert _dice(labels == RIGHT_LUNG, chest["right"]) > 0.95 and not labels[:, :, :8].any()


@pytest.mark.parametrize("hu, spacing", [
    (np.zeros((8, 8), np.int16), (1.0, 1.0, 1.0)),
    (np.zeros((2, 8, 8, 8), np.int16), (1.0, 1.0, 1.0)),
    (np.zeros((8, 8, 8), bool), (1.0, 1.0, 1.0)),
    (np.zeros((8, 8, 8), np.int16), (1.0, 1.0)),
    (np.zeros((8, 8, 8), np.int16), (1.0, 0.0, 1.0)),
    (np.zeros((8, 8, 8), np.int16), (1.0, float("nan"), 1.0)),
])
def test_bad_input_is_refused(hu, spacing):
    with pytest.raises(ValueError, match="hu must|spacing_mm must"):
        lung_mask(hu, spacing)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """[D, H, W] int16 HU sorted inferior -> superior by ImagePositionPatient z, and (d, h, w) spacing."""
    pydicom = pytest.importorskip("pydicom")
    slices = sorted((pydicom.dcmread(path) for path in folder.glob("*.dcm")),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    positions = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    row_mm, column_mm = (float(v) for v in slices[0].PixelSpacing)
    return hu.astype(np.int16), (float(np.median(np.diff(positions))), row_mm, column_mm)


@pytest.mark.skipif(not (DATA / "covid-ct-md" / "P001").is_dir(), reason="../shared/data not present")
def test_real_covid_ct_has_two_plausible_lungs():
    hu, spacing = _read_dicom_series(DATA / "covid-ct-md" / "P001")
    start = time.perf_counter()
    labels = lung_mask(hu, spacing)
    elapsed = time.perf_counter() - start
    voxel_ml = float(np.prod(spacing)) / 1000.0
    right_ml = (labels == RIGHT_LUNG).sum() * voxel_ml
    left_ml = (labels == LEFT_LUNG).sum() * voxel_ml
    print(f"P001 {hu.shape}: lung_mask {elapsed:.3f} s, right {right_ml:.0f} mL, left {left_ml:.0f} mL")
    assert 1000.0 < right_ml < 4500.0 and 1000.0 < left_ml < 4500.0
    assert 3000.0 < right_ml + left_ml < 8000.0
    columns = np.arange(labels.shape[2])
    assert columns[np.nonzero(labels == RIGHT_LUNG)[2]].mean() < columns[np.nonzero(labels == LEFT_LUNG)[2]].mean()
    # The top slices of this series hold the trachea above the lung apices: it must stay out of the mask.
    top = hu[-1] < -900
    assert top.any() and not labels[-1][top & (np.abs(columns - labels.shape[2] / 2) < 40)[None, :]].any()
