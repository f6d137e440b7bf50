"""Python API on an in-memory phantom: covfast.infer(array, spacing, infection_mask=array)."""

import numpy as np
import pytest
from test_lung import _chest_phantom

import covfast


@pytest.fixture(scope="module")
def chest():
    return _chest_phantom(1.25)


def test_infer_array_with_mask_matches_phantom_truth(chest, tmp_path):
    classes = np.zeros(chest["hu"].shape, np.uint8)
    classes[chest["ggo"]] = 1
    classes[chest["consolidation"]] = 2
    result = covfast.infer(chest["hu"], spacing=chest["spacing"], infection_mask=classes, device="cpu")
    report = result.report
    voxel_ml = np.prod(chest["spacing"]) / 1000
    truth_lung_ml = (chest["right"] | chest["left"]).sum() * voxel_ml
    truth_ggo_ml = chest["ggo"].sum() * voxel_ml
    assert report["lung_volume_ml"]["total"] == pytest.approx(truth_lung_ml, rel=0.05)
    assert report["lung_volume_ml"]["right"] == pytest.approx(chest["right"].sum() * voxel_ml, rel=0.05)
    # GGO lies well inside the left lung; consolidation touches the wall, so only most of it is inside the mask.
    assert report["infected_volume_ml"]["ggo"] == pytest.approx(truth_ggo_ml, rel=0.05)
    assert 0.7 * chest["consolidation"].sum() * voxel_ml <= report["infected_volume_ml"]["consolidation"]
    truth_pct = 100 * (chest["ggo"].sum() + chest["consolidation"].sum()) / (chest["right"] | chest["left"]).sum()
    assert report["percent_infected"]["volumetric"] == pytest.approx(truth_pct, rel=0.15)
    assert result.ct_class == "CT1"
    assert report["zones"]["left"][0]["percent_infected"] > 0  # the GGO sits in the lower/middle left lung
    assert result.lung_mask.shape == chest["hu"].shape
    assert report["input"]["kind"] == "array"


def test_infer_array_without_model_reports_no_infection(chest, monkeypatch):
    from covfast.errors import ModelNotInstalledError
    from covfast.pipeline import infection

    def no_model(*args, **kwargs):
        raise ModelNotInstalledError("no infection weights found")

    monkeypatch.setattr(infection, "segment_infection", no_model)
    result = covfast.infer(chest["hu"], spacing=chest["spacing"], device="cpu")
    assert result.report["percent_infected"]["volumetric"] is None
    assert result.infection_mask is None
    assert any("no infection model" in note for note in result.report["notes"])


def test_infer_rejects_an_unknown_engine(chest):
    from covfast.errors import UsageError

    with pytest.raises(UsageError, match="unknown engine 'openvino'"):
        covfast.infer(chest["hu"], spacing=chest["spacing"], device="cpu", engine="openvino")
