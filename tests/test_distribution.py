"""Peripheral predominance and laterality of the infection (covfast.pipeline.distribution)."""

import numpy as np
import pytest

from covfast.pipeline.distribution import OUTER_FRACTION, lesion_distribution, peripheral_masks

SPACING = (2.0, 0.8, 0.8)


def _lungs(depth: int = 6, size: int = 96) -> np.ndarray:
    """[D, H, W] uint8: two discs of radius 20 px per slice, right lung (1) at low columns, left (2) at high."""
    rows, cols = np.mgrid[:size, :size]
    lung = np.zeros((depth, size, size), np.uint8)
    for label, centre in ((1, 26), (2, 70)):
        disc = (rows - size // 2) ** 2 + (cols - centre) ** 2 <= 20**2
        lung[:, disc] = label
    return lung


def _ring(size: int, centre_col: int, r_lo: float, r_hi: float) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    r = np.hypot(rows - size // 2, cols - centre_col)
    return (r >= r_lo) & (r < r_hi)


def test_outer_third_of_a_disc_is_its_rim():
    lung = _lungs()[0]
    outer = peripheral_masks(lung, (0.8, 0.8))
    assert not (outer & (lung == 0)).any()
    # A disc of radius 20 px: depth <= 1/3 of the largest depth is the rim from radius ~13.3 outwards.
    assert outer[_ring(96, 26, 15, 19)].all()
    assert not outer[_ring(96, 26, 0, 12)].any()
    # The rim of a disc holds 1 - (2/3)^2 = 5/9 of its area.
    frac = outer[lung == 1].mean()
    assert frac == pytest.approx(1 - (1 - OUTER_FRACTION) ** 2, abs=0.06)


@pytest.mark.parametrize("where, pattern", [("rim", "peripheral"), ("core", "central")])
def test_peripheral_and_central_infection(where, pattern):
    lung = _lungs()
    infected = np.zeros(lung.shape, np.uint8)
    band = _ring(96, 26, 16, 20) if where == "rim" else _ring(96, 26, 0, 8)
    infected[:, band] = 1
    infected[:, _ring(96, 70, 16, 20) if where == "rim" else _ring(96, 70, 0, 8)] = 2  # class 2 counts too
    out = lesion_distribution(lung, infected, SPACING, min_lesion_ml=0.1)
    assert out["pattern"] == pattern
    if pattern == "peripheral":
        assert out["peripheral_fraction"] > 0.9 and out["peripheral_odds_ratio"] > 5
    else:
        assert out["peripheral_fraction"] < 0.1 and out["peripheral_odds_ratio"] < 0.2
    assert out["bilateral"] is True
    assert out["right_share"] == pytest.approx(0.5, abs=0.02)
    assert 0.4 < out["lung_peripheral_fraction"] < 0.7


def test_infection_spread_like_the_lung_has_odds_ratio_one():
    lung = _lungs()
    out = lesion_distribution(lung, lung > 0, SPACING)
    assert out["peripheral_fraction"] == pytest.approx(out["lung_peripheral_fraction"])
    assert out["peripheral_odds_ratio"] == pytest.approx(1.0, abs=1e-3)


def test_unilateral_infection_outside_the_lung_ignored():
    lung = _lungs()
    infected = np.zeros(lung.shape, np.uint8)
    infected[:, _ring(96, 26, 16, 20)] = 1
    infected[:, :5, :] = 1  # outside both lungs: not counted
    out = lesion_distribution(lung, infected, SPACING, min_lesion_ml=0.1)
    assert out["bilateral"] is False
    assert out["right_share"] == 1.0
    assert out["peripheral_fraction"] > 0.9


def test_no_infection():
    lung = _lungs()
    assert lesion_distribution(lung, None, SPACING) is None
    out = lesion_distribution(lung, np.zeros(lung.shape, np.uint8), SPACING)
    assert out["pattern"] is None and out["peripheral_odds_ratio"] is None and out["bilateral"] is False
    assert out["lung_peripheral_fraction"] > 0


def test_wholly_peripheral_odds_ratio_is_finite():
    lung = _lungs()
    infected = np.zeros(lung.shape, np.uint8)
    infected[:, _ring(96, 26, 19, 20)] = 1
    out = lesion_distribution(lung, infected, SPACING)
    assert out["peripheral_fraction"] == 1.0
    assert np.isfinite(out["peripheral_odds_ratio"]) and out["peripheral_odds_ratio"] > 1


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="one shape"):
        lesion_distribution(_lungs(), np.zeros((2, 96, 96), np.uint8), SPACING)


def test_medseg_check_finds_the_lungs_of_an_8bit_crop_and_scores_a_rim_lesion():
    """training/analysis/medseg_pattern.py: lungs of a lung-window crop from the image, rim infection -> OR > 1."""
    from covfast.pipeline.distribution import odds_ratio
    from training.analysis.medseg_pattern import lung_labels

    # Two lungs with a mediastinum between them wider than the mask's closing bridges.
    lungs = (_ring(128, 32, 0, 22) * 1 + _ring(128, 96, 0, 22) * 2).astype(np.uint8)
    image = np.where(lungs > 0, 40, 200).astype(np.uint8)  # dark lungs in bright tissue
    infection = np.zeros(lungs.shape, bool)
    infection[_ring(128, 32, 18, 22)] = True
    image[infection] = 150  # dense infection is bright: the lung mask must still hold it
    found = lung_labels(image, infection)
    assert set(np.unique(found)) == {0, 1, 2}
    assert ((found > 0) == (lungs > 0)).mean() > 0.97
    outer = peripheral_masks(np.pad(found, 1), (1.0, 1.0))[1:-1, 1:-1]
    sick = infection & (found > 0)
    ratio = odds_ratio(int(sick.sum()), int((sick & outer).sum()), int((found > 0).sum()), int(outer.sum()))
    assert ratio > 5
    assert odds_ratio(10, 5, 100, 50) == pytest.approx(1.0)


def test_pattern_check_slice_odds_ratios_match_the_volume_rule():
    """training/analysis/pattern_check.py: per-slice odds ratios, NaN on slices without infection."""
    from training.analysis.pattern_check import auc, slice_odds_ratios

    lung = _lungs(depth=3)
    infected = np.zeros(lung.shape, np.uint8)
    infected[0][_ring(96, 26, 16, 20)] = 1  # rim
    infected[1][_ring(96, 26, 0, 8)] = 1  # core
    ratios = slice_odds_ratios(lung, infected, SPACING)
    assert ratios[0] > 1 > ratios[1] and np.isnan(ratios[2])
    one = lesion_distribution(lung[:1], infected[:1], SPACING)
    assert ratios[0] == pytest.approx(one["peripheral_odds_ratio"])
    assert auc([3.0, 2.0], [1.0, 0.5]) == 1.0 and auc([1.0], [1.0]) == 0.5


def test_zenodo_slice_names_give_their_patient():
    from training.analysis.medseg_pattern import patient_of

    assert patient_of("Data-1_coronacases_org_004_12") == "coronacases_org_004"
    # One Radiopaedia case, two series.
    a = patient_of("Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_3")
    assert a == patient_of("Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm_100") == "covid-19-pneumonia-10"
    assert patient_of("17") == "unknown"


def test_odds_ratio_interval_over_lesions():
    """The 95 % interval resamples 3D lesions: it brackets the ratio, is None below five lesions, and is reproducible."""
    lung = _lungs(depth=12)
    rows, cols = np.mgrid[:96, :96]
    infected = np.zeros(lung.shape, np.uint8)
    # Eight separate lesions: six small blobs at the rim of the right lung, two in the core of the left.
    for k, angle in enumerate(np.linspace(0, 2 * np.pi, 6, endpoint=False)):
        r0, c0 = 48 + 17 * np.sin(angle), 26 + 17 * np.cos(angle)
        infected[2 * k : 2 * k + 2][:, (rows - r0) ** 2 + (cols - c0) ** 2 <= 4] = 1
    infected[1:3][:, (rows - 48) ** 2 + (cols - 70) ** 2 <= 9] = 1
    infected[8:10][:, (rows - 48) ** 2 + (cols - 70) ** 2 <= 9] = 1
    out = lesion_distribution(lung, infected, SPACING)
    low, high = out["peripheral_odds_ratio_interval"]
    assert out["lesions_counted"] == 8
    assert low <= out["peripheral_odds_ratio"] <= high and low < high
    assert lesion_distribution(lung, infected, SPACING)["peripheral_odds_ratio_interval"] == [low, high]
    single = np.zeros(lung.shape, np.uint8)
    single[:, _ring(96, 26, 16, 20)] = 1
    one = lesion_distribution(lung, single, SPACING)
    assert one["lesions_counted"] == 1 and one["peripheral_odds_ratio_interval"] is None
