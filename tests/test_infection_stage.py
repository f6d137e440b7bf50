"""Infection stage contract on a small synthetic volume: shapes, dtypes, zeros off the lungs, progress, errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from covfast.errors import ModelNotInstalledError
from covfast.pipeline.infection import (
    CROP_MARGIN,
    WEIGHTS_DIR,
    gate_aerated,
    installed_models,
    lung_crop,
    lung_slices,
    segment_infection,
    slice_view,
    window_hu,
)

HAS_WEIGHTS = (WEIGHTS_DIR / "infnet.safetensors").exists()


def _volume():
    rng = np.random.default_rng(0)
    hu = np.full((3, 48, 40), -1000, np.int16)
    lung = np.zeros(hu.shape, np.uint8)
    lung[:2, 10:38, 4:18] = 1
    lung[:2, 10:38, 22:36] = 2
    hu[lung > 0] = -850
    hu[:2, 20:26, 8:14] = 20  # a dense lesion in the right lung
    hu += rng.integers(-20, 20, hu.shape).astype(np.int16)
    return hu, lung


def test_window_hu_maps_the_lung_window():
    out = window_hu(np.array([-2000, -1000, -400, 200, 3000], np.int16))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]


def test_lung_crop_bounding_box_with_margin():
    lung = np.zeros((100, 100), bool)
    lung[20:70, 30:40] = True
    rows, cols = lung_crop(lung)
    margin_r, margin_c = round(CROP_MARGIN * 50), round(CROP_MARGIN * 10)
    assert (rows.start, rows.stop) == (20 - margin_r, 70 + margin_r)
    assert (cols.start, cols.stop) == (30 - margin_c, 40 + margin_c)
    assert lung_crop(np.zeros((5, 5), bool)) is None


def test_lung_slices_and_slice_view_follow_the_lung():
    hu, lung = _volume()
    work = lung_slices(lung)
    assert [z for z, _ in work] == [0, 1]
    z, (rows, cols) = work[0]
    view = slice_view(hu, z, (rows, cols))
    # Transposed: the crop's columns (left-right) run down the view, as in the released training slices.
    assert view.shape == (cols.stop - cols.start, rows.stop - rows.start) and view.flags.c_contiguous
    assert np.array_equal(view, window_hu(hu[z, rows, cols]).T)


def test_gate_aerated_zeroes_only_voxels_below_the_threshold():
    prob = np.full((1, 2, 3), 0.9, np.float32)
    hu = np.array([[[-1000, -801, -800], [-500, 40, -900]]], np.int16)
    gated = gate_aerated(prob, hu, -800.0)
    assert gated.dtype == np.float32
    assert gated.tolist() == [[[0.0, 0.0, pytest.approx(0.9)], [pytest.approx(0.9), pytest.approx(0.9), 0.0]]]
    assert gate_aerated(prob, hu, None) is prob


def test_no_weights_raises(tmp_path):
    hu, lung = _volume()
    assert installed_models(tmp_path) == []
    with pytest.raises(ModelNotInstalledError, match="no infection model"):
        segment_infection(hu, lung, (2.0, 0.7, 0.7), weights_dir=tmp_path)


def test_tampered_weights_raise(tmp_path):
    if not HAS_WEIGHTS:
        pytest.skip("needs the shipped infnet weights")
    card = json.loads((WEIGHTS_DIR / "infnet.json").read_text())
    (tmp_path / "infnet.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    (tmp_path / "infnet.safetensors").write_bytes((WEIGHTS_DIR / "infnet.safetensors").read_bytes())
    with pytest.raises(ModelNotInstalledError, match="SHA-256"):
        segment_infection(*_volume(), (2.0, 0.7, 0.7), weights_dir=tmp_path)


def test_shape_mismatch_raises():
    hu, lung = _volume()
    with pytest.raises(ValueError, match="one shape"):
        segment_infection(hu, lung[:, :10], (2.0, 0.7, 0.7))


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_segment_infection_contract():
    hu, lung = _volume()
    calls = []
    result = segment_infection(hu, lung, (2.0, 0.7, 0.7), batch_size=1, progress=lambda d, t: calls.append((d, t)))
    assert result.prob.shape == hu.shape and result.prob.dtype == np.float32
    assert 0 <= result.prob.min() and result.prob.max() <= 1
    assert not result.prob[2].any()  # no lung on the last slice: not run
    assert not result.prob[:, :5].any()  # outside the lung crop with its margin
    assert calls == [(1, 2), (2, 2)]
    names = [m["name"] for m in result.models]
    assert names[0] == "infnet" and all(len(m["sha256"]) == 64 for m in result.models)
    if "infnet_multiclass" in names:
        assert result.classes.shape == hu.shape and result.classes.dtype == np.uint8
        assert set(np.unique(result.classes)) <= {0, 1, 2}
    else:
        assert result.classes is None
    assert set(result.timings) == {"load", "infer"}


def test_installed_models_cards_match_files():
    for model in installed_models():
        assert Path(model["file"]).exists()
        assert model["task"] in ("infection", "multiclass", "diagnosis") and model["params"] > 0
