"""Severity rules on hand-computed per-slice counts."""

import numpy as np
import pytest

from covfast.pipeline.severity import SeverityRules, mosmed_class, summarize, zone_score


@pytest.mark.parametrize(
    "percent, infected_ml, expected",
    [
        (0.0, 0.0, "CT0"),
        (10.0, 0.2, "CT0"),
        (0.01, 0.6, "CT1"),
        (24.99, 50, "CT1"),
        (25.0, 50, "CT2"),
        (49.9, 50, "CT2"),
        (50.0, 50, "CT3"),
        (74.99, 50, "CT3"),
        (75.0, 50, "CT4"),
        (100.0, 50, "CT4"),
    ],
)
def test_mosmed_class_boundaries(percent, infected_ml, expected):
    assert mosmed_class(percent, infected_ml) == expected


def test_mosmed_class_unknown():
    assert mosmed_class(None, 0.0) is None
    assert mosmed_class(float("nan"), 1.0) is None


@pytest.mark.parametrize("percent, score", [(0, 0), (0.1, 1), (4.99, 1), (5, 2), (25, 3), (50, 4), (75, 5), (99, 5)])
def test_zone_score(percent, score):
    assert zone_score(percent) == score


def _counts():
    # 6 slices; right lung 100 voxels on slices 0-5, left lung 50 voxels on slices 1-4.
    lung = np.zeros((6, 2), np.int64)
    lung[:, 0] = 100
    lung[1:5, 1] = 50
    infected = np.zeros((6, 2, 2), np.int64)
    infected[0, 0, 0] = 40  # right lower: GGO
    infected[5, 0, 1] = 10  # right upper: consolidation
    infected[2, 1, 0] = 5  # left: GGO
    return lung, infected


def test_summarize_volumes_and_percentages():
    lung, infected = _counts()
    spacing = (2.0, 1.0, 0.5)  # 1 mm^3 voxels -> 0.001 mL; 0.5 mm^2 pixels
    out = summarize(
        lung,
        infected,
        spacing,
        np.arange(6) * 2.0,
        multiclass=True,
        rules=SeverityRules(min_lesion_ml=0.01, min_lesion_area_mm2=3.0, min_slice_lung_mm2=0.0),
    )
    assert out["lung_volume_ml"] == pytest.approx({"right": 0.6, "left": 0.2, "total": 0.8})
    assert out["infected_volume_ml"]["total"] == pytest.approx(0.055)
    assert out["infected_volume_ml"]["ggo"] == pytest.approx(0.045)
    assert out["infected_volume_ml"]["consolidation"] == pytest.approx(0.010)
    assert out["percent_infected"]["volumetric"] == pytest.approx(100 * 55 / 800)
    ratios = [40 / 100, 0, 5 / 150, 0, 0, 10 / 100]
    assert out["percent_infected"]["mean_of_slices"] == pytest.approx(100 * np.mean(ratios))
    assert out["severity"]["ct_class"] == "CT1"
    slices = out["slices"]
    assert [s["covid_positive"] for s in slices] == [True, False, False, False, False, True]  # 2.5 mm^2 < 3 on slice 2
    assert slices[0]["lung_area_mm2"] == pytest.approx(50.0)
    assert slices[0]["infected_area_mm2"] == pytest.approx(20.0)
    assert slices[2]["ratio"] == pytest.approx(5 / 150)
    assert slices[3]["z_mm"] == 6.0


def test_summarize_zones():
    lung, infected = _counts()
    out = summarize(lung, infected, (1.0, 1.0, 1.0), np.arange(6.0), multiclass=True)
    right = out["zones"]["right"]
    assert [z["zone"] for z in right] == ["lower", "middle", "upper"]
    assert right[0]["slices"] == [0, 1] and right[2]["slices"] == [4, 5]
    assert right[0]["percent_infected"] == pytest.approx(100 * 40 / 200)
    assert right[0]["score"] == 2
    assert right[1]["score"] == 0
    assert right[2]["percent_infected"] == pytest.approx(100 * 10 / 200)
    left = out["zones"]["left"]
    assert left[0]["slices"][0] == 1 and left[-1]["slices"][1] == 4
    assert out["zones"]["right_percent_infected"] == pytest.approx(100 * 50 / 600)
    assert out["zone_ct_score"] == sum(z["score"] for z in right + left)


def test_summarize_without_infection():
    lung, _ = _counts()
    out = summarize(lung, None, (1.0, 1.0, 1.0), np.arange(6.0), multiclass=False)
    assert out["percent_infected"] == {"volumetric": None, "mean_of_slices": None}
    assert out["severity"]["ct_class"] is None
    assert all(s["covid_positive"] is None for s in out["slices"])
    assert out["lung_volume_ml"]["total"] == pytest.approx(0.8)


def test_summarize_no_lung():
    lung = np.zeros((3, 2), np.int64)
    infected = np.zeros((3, 2, 2), np.int64)
    out = summarize(lung, infected, (1.0, 1.0, 1.0), np.arange(3.0), multiclass=False)
    assert out["percent_infected"]["volumetric"] is None
    assert out["severity"]["ct_class"] is None
    assert out["zone_ct_score"] == 0
