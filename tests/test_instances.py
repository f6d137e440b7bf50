"""Lesion instances and the paper's per-slice COCO-style AP (covfast.instances)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from covfast.instances import (
    IOU_THRESHOLDS,
    Instance,
    evaluate_instances,
    extract_instances,
    mask_iou,
    slice_ap,
    truth_instances,
)

SEMISEG = (
    Path(__file__).resolve().parents[2] / "shared/data/infnet-semiseg/TrainingSet/LungInfection-Train/Doctor-label"
)


def _square(shape, r0, c0, side):
    mask = np.zeros(shape, bool)
    mask[r0 : r0 + side, c0 : c0 + side] = True
    return mask


def _inst(mask, score=1.0):
    return Instance((0.0, 0.0, 1.0, 1.0), score, mask)


def test_extract_instances_boxes_scores_and_min_area():
    prob = np.zeros((40, 50), np.float32)
    prob[2:12, 3:8] = 0.9  # 50 px
    prob[20:30, 30:45] = 0.6  # 150 px
    prob[35:37, 0:3] = 0.99  # 6 px speck, below MIN_AREA
    found = extract_instances(prob)
    assert [round(i.score, 6) for i in found] == [0.9, 0.6]
    assert found[0].box == (3.0, 2.0, 8.0, 12.0)
    assert found[1].box == (30.0, 20.0, 45.0, 30.0)
    assert found[1].mask.sum() == 150
    assert len(extract_instances(prob, min_area=1)) == 3
    # Diagonal neighbours join (8-connectivity).
    diag = np.zeros((5, 5), np.float32)
    diag[[0, 1, 2], [0, 1, 2]] = 1.0
    assert len(extract_instances(diag, min_area=1)) == 1
    assert extract_instances(np.zeros((8, 8), np.float32)) == []


def test_mask_iou_against_areas():
    a = _square((20, 20), 0, 0, 10)
    b = _square((20, 20), 5, 0, 10)
    iou = mask_iou([a, b], [a])
    np.testing.assert_allclose(iou[:, 0], [1.0, 50 / 150])
    assert mask_iou([], [a]).shape == (0, 1)


def test_slice_ap_rules_and_values():
    a = _square((40, 40), 0, 0, 10)
    b = _square((40, 40), 20, 20, 10)
    t = len(IOU_THRESHOLDS)
    np.testing.assert_array_equal(slice_ap([], []), np.ones(t))
    np.testing.assert_array_equal(slice_ap([_inst(a)], []), np.zeros(t))
    np.testing.assert_array_equal(slice_ap([], [_inst(a)]), np.zeros(t))
    np.testing.assert_array_equal(slice_ap([_inst(a), _inst(b, 0.5)], [_inst(a), _inst(b)]), np.ones(t))
    # A false positive ranked above the only true positive: precision 1/2 at every recall point.
    fp = _square((40, 40), 30, 0, 5)
    np.testing.assert_allclose(slice_ap([_inst(fp, 0.9), _inst(a, 0.8)], [_inst(a)]), np.full(t, 0.5))
    # One of two lesions found: recall reaches 0.5 only, so 51 of the 101 recall points have precision 1.
    np.testing.assert_allclose(slice_ap([_inst(a)], [_inst(a), _inst(b)]), np.full(t, 51 / 101))
    # 80 px inside a 100 px truth: IoU 0.8, matched up to t = 0.80 only.
    shifted = _square((40, 40), 0, 0, 10)
    shifted[8:, :] = False
    ap = slice_ap([_inst(shifted)], [_inst(a)])
    np.testing.assert_allclose(ap, (IOU_THRESHOLDS <= 0.8 + 1e-9).astype(float))


def test_truth_instances_keep_every_component():
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = mask[5:7, 5:7] = True
    assert [inst.mask.sum() for inst in truth_instances(mask)] == [1, 4]


@pytest.mark.skipif(not SEMISEG.is_dir(), reason="needs ../shared/data")
def test_evaluate_instances_on_real_slices(tmp_path):
    from PIL import Image

    from covfast.pipeline.infection import load_models, predict_slices

    images, masks, own = tmp_path / "Imgs", tmp_path / "GT", tmp_path / "Own"
    for folder in (images, masks, own):
        folder.mkdir()
    names = sorted(p.stem for p in (SEMISEG / "Imgs").glob("*.jpg"))[:2]
    models = load_models("cpu", multiclass=False)
    for name in names:
        shutil.copy(SEMISEG / "Imgs" / f"{name}.jpg", images)
        shutil.copy(SEMISEG / "GT" / f"{name}.png", masks)
        image = np.asarray(Image.open(images / f"{name}.jpg").convert("L"))
        prob = predict_slices(models, image[None])[0][0]
        # A mask made of the model's own instances must score AP 1 at every threshold.
        own_mask = np.zeros(image.shape, np.uint8)
        for inst in extract_instances(prob):
            own_mask[inst.mask] = 255
        Image.fromarray(own_mask).save(own / f"{name}.png")
    result = evaluate_instances(images, masks, json_path=tmp_path / "scores.json")
    assert result["n_images"] == 2 and (tmp_path / "scores.json").exists()
    for key in ("ap50", "ap75", "map"):
        assert 0.0 <= result[key] <= 1.0
        assert result[key] == pytest.approx(np.mean([e[key] for e in result["per_image"]]))
    assert result["ap50"] >= result["ap75"]
    perfect = evaluate_instances(images, own)
    assert perfect["map"] == pytest.approx(1.0)
    assert all(e["n_pred"] == e["n_truth"] and e["n_pred"] >= 1 for e in perfect["per_image"])


def test_instance_oracle_bounds():
    """training/analysis/instance_rules.py --oracle: a mask that merges two ground-truth patches is cut back into
    them by the nearest-component split, and a closing merges patches closer than its diameter."""
    from training.analysis.instance_rules import closed_truth, oracle_partition

    truth = np.zeros((40, 40), bool)
    truth[5:15, 5:15] = True
    truth[5:15, 18:28] = True  # a 3-pixel gap
    gt = truth_instances(truth)
    merged = np.zeros((40, 40), np.float32)
    merged[5:15, 5:28] = 0.9
    assert len(extract_instances(merged)) == 1 and slice_ap(extract_instances(merged), gt).max() == 0
    parts = oracle_partition(merged, gt)
    assert len(parts) == 2 and slice_ap(parts, gt)[0] == pytest.approx(1.0)
    assert len(closed_truth(gt, truth.shape, 1)) == 2
    assert len(closed_truth(gt, truth.shape, 3)) == 1
