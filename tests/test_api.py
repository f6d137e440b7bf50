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
    inside = (classes > 0) & (result.lung_mask > 0)
    dist = report["distribution"]
    assert dist["right_share"] == pytest.approx((inside & (result.lung_mask == 1)).sum() / inside.sum())
    assert dist["pattern"] in ("peripheral", "central") and dist["peripheral_odds_ratio"] > 0


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
    assert result.report["distribution"] is None


def test_infer_rejects_an_unknown_engine(chest):
    from covfast.errors import UsageError

    with pytest.raises(UsageError, match="unknown engine 'openvino'"):
        covfast.infer(chest["hu"], spacing=chest["spacing"], device="cpu", engine="openvino")


def _fake_segmentation(chest, monkeypatch):
    """The infection stage replaced by a fixed result: one large lesion and one 8-voxel speck in the left lung."""
    from covfast.pipeline import infection
    from covfast.pipeline.run import _reduce

    left = np.argwhere(chest["left"])
    centre = left[len(left) // 2]
    mask = np.zeros(chest["hu"].shape, np.uint8)
    mask[chest["ggo"]] = 1
    speck = tuple(slice(c, c + 2) for c in centre)
    assert not mask[speck].any()
    mask[speck] = 2
    prob = np.where(mask > 0, 0.9, 0.1).astype(np.float32)

    def segment(hu, lung, spacing_mm, **kwargs):
        lung_voxels, infected_voxels, _ = _reduce(lung, mask, 0.5)
        counts = infection.InfectionCounts(lung_voxels, infected_voxels, _reduce(lung, prob, 0.5)[2])
        return infection.InfectionResult(prob.copy(), mask.copy(), [], {}, {}, {}, mask.copy(), counts, {})

    monkeypatch.setattr(infection, "segment_infection", segment)
    return mask, speck


def test_small_network_components_are_dropped_from_masks_and_numbers(chest, monkeypatch):
    from covfast.api import load
    from covfast.pipeline.run import analyze
    from covfast.pipeline.severity import SeverityRules

    mask, speck = _fake_segmentation(chest, monkeypatch)
    volume = load(chest["hu"], spacing=chest["spacing"])
    voxel_ml = float(np.prod(chest["spacing"])) / 1000
    speck_ml = 8 * voxel_ml
    assert speck_ml < 0.2 < chest["ggo"].sum() * voxel_ml
    kept = analyze(volume, device="cpu", diagnose_volume=False, rules=SeverityRules(min_component_ml=0))
    cleaned = analyze(volume, device="cpu", diagnose_volume=False)
    assert cleaned.report["rules"]["min_component_ml"] == 0.2
    assert kept.infection_mask[speck].all() and not cleaned.infection_mask[speck].any()
    assert not cleaned.infection_prob[speck].any()
    np.testing.assert_array_equal(cleaned.infection_mask[mask == 1], 1)  # the large lesion stays
    before, after = kept.report["infected_volume_ml"], cleaned.report["infected_volume_ml"]
    assert before["consolidation"] == pytest.approx(speck_ml)
    assert after["total"] == pytest.approx(before["total"] - speck_ml)
    assert after["total"] == pytest.approx(before["ggo"])
    assert after["soft"] == pytest.approx(before["soft"] - 8 * 0.9 * voxel_ml, rel=1e-5)
    # A mask given by the user is counted as it is.
    given = covfast.infer(chest["hu"], spacing=chest["spacing"], infection_mask=mask, device="cpu")
    assert given.infection_mask[speck].all()
    assert given.report["infected_volume_ml"]["consolidation"] == pytest.approx(speck_ml)


def test_dome_caps_are_dropped_from_masks_and_numbers(monkeypatch):
    """The pipeline applies the dome-cap rule (SeverityRules.dome_cap_support) to the network's masks and counts
    again; null turns it off. Lung mask and network are stand-ins: a lung block with a dome's island (a hole) in its
    lowest slices, a cap over the island and a lesion resting on lung."""
    from covfast.api import load
    from covfast.pipeline import infection, lung
    from covfast.pipeline.run import _reduce, analyze
    from covfast.pipeline.severity import SeverityRules

    shape = (8, 40, 60)
    lungs = np.zeros(shape, np.uint8)
    lungs[:, 4:36, 4:28], lungs[:, 4:36, 32:56] = 1, 2
    lungs[0:3, 12:24, 10:22] = 0  # the dome's island in the right lung
    mask = np.zeros(shape, np.uint8)
    mask[3, 12:24, 10:22] = 1  # the cap: 144 voxels
    mask[4:6, 10:20, 40:50] = 1  # a lesion on lung: 200 voxels
    prob = np.where(mask > 0, 0.9, 0.1).astype(np.float32)

    def segment(hu, lung_mask, spacing_mm, **kwargs):
        lung_voxels, infected_voxels, _ = _reduce(lung_mask, mask, 0.5)
        counts = infection.InfectionCounts(lung_voxels, infected_voxels, _reduce(lung_mask, prob, 0.5)[2])
        return infection.InfectionResult(prob.copy(), mask.copy(), [], {}, {}, {}, mask.copy(), counts, {})

    monkeypatch.setattr(lung, "lung_mask", lambda hu, spacing, **kwargs: lungs.copy())
    monkeypatch.setattr(infection, "segment_infection", segment)
    spacing = (2.0, 1.0, 1.0)
    hu = np.random.default_rng(0).integers(-1000, 100, shape).astype(np.int16)
    volume = load(hu, spacing=spacing)
    cleaned = analyze(volume, device="cpu", diagnose_volume=False)
    kept = analyze(volume, device="cpu", diagnose_volume=False, rules=SeverityRules(dome_cap_support=None))
    assert cleaned.report["rules"]["dome_cap_support"] == 0.6 and kept.report["rules"]["dome_cap_support"] is None
    assert kept.infection_mask[3].sum() == 144 and not cleaned.infection_mask[3].any()
    assert not cleaned.infection_prob[3][mask[3] > 0].any()  # zeroed where the cap was
    np.testing.assert_array_equal(cleaned.infection_mask[4:6], mask[4:6])
    assert kept.report["infected_volume_ml"]["total"] == pytest.approx(344 * 0.002)
    assert cleaned.report["infected_volume_ml"]["total"] == pytest.approx(200 * 0.002)


def test_lungs_at_the_image_edge_get_a_note(monkeypatch):
    """A lung mask reaching the in-plane edge means the field of view cuts the chest: the report says so."""
    from covfast.api import load
    from covfast.pipeline import lung
    from covfast.pipeline.run import CUT_LUNG_NOTE, analyze

    shape = (6, 30, 40)
    hu = np.random.default_rng(1).integers(-1000, 100, shape).astype(np.int16)
    volume = load(hu, spacing=(2.0, 1.0, 1.0))
    inside = np.zeros(shape, np.uint8)
    inside[:, 5:25, 5:18], inside[:, 5:25, 22:35] = 1, 2
    monkeypatch.setattr(lung, "lung_mask", lambda hu, spacing, **kwargs: inside.copy())
    assert CUT_LUNG_NOTE not in analyze(volume, device="cpu", diagnose_volume=False, infection_mask=np.zeros(shape)).report["notes"]
    cut = inside.copy()
    cut[:, 5:25, 0:18] = 1  # the right lung reaches column 0
    monkeypatch.setattr(lung, "lung_mask", lambda hu, spacing, **kwargs: cut.copy())
    assert CUT_LUNG_NOTE in analyze(volume, device="cpu", diagnose_volume=False, infection_mask=np.zeros(shape)).report["notes"]
