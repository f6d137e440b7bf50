"""Slice metrics against hand-computed values and a naive oracle, and evaluate_slices on a synthetic folder."""

from pathlib import Path

import numpy as np
import pytest

from covfast.evaluate import binary_metrics, evaluate_slices, multiclass_metrics, s_measure, summarize

WEIGHTS = Path(__file__).resolve().parents[1] / "covfast" / "weights" / "infnet.safetensors"


def test_binary_metrics_hand_computed():
    truth = np.array([[1, 1, 0, 0]], bool)
    prob = np.array([[0.9, 0.2, 0.7, 0.1]])
    m = binary_metrics(prob, truth)
    # P = {0, 2}, G = {0, 1}: TP 1, FP 1, FN 1, TN 1.
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(1 / 3)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["mae"] == pytest.approx((0.1 + 0.8 + 0.7 + 0.1) / 4)
    assert m["present"]


def test_dice_mean256_matches_naive_loop():
    rng = np.random.default_rng(3)
    prob = rng.random((13, 7))
    truth = rng.random((13, 7)) > 0.6
    naive = []
    for j in range(256):
        pred = prob >= j / 255
        tp, denom = (pred & truth).sum(), pred.sum() + truth.sum()
        naive.append(2 * tp / denom if denom else 1.0)
    assert binary_metrics(prob, truth)["dice_mean256"] == pytest.approx(np.mean(naive), abs=1e-12)


def _e_measure_matrix(binary, truth):
    # The toolbox's per-pixel matrices: alignment of the mean-removed maps, enhanced by (a + 1)^2 / 4.
    eps = np.finfo(np.float64).eps
    f, g = binary.astype(np.float64), truth.astype(np.float64)
    if not truth.any():
        enhanced = 1.0 - f
    elif truth.all():
        enhanced = f
    else:
        af, ag = f - f.mean(), g - g.mean()
        enhanced = (2 * ag * af / (ag * ag + af * af + eps) + 1) ** 2 / 4
    return enhanced.sum() / (truth.size - 1 + eps)


@pytest.mark.parametrize("case", ["mixed", "empty", "full"])
def test_e_measure_matches_per_pixel_matrices(case):
    rng = np.random.default_rng(5)
    prob = rng.random((11, 9))
    truth = {"mixed": rng.random((11, 9)) > 0.7, "empty": np.zeros((11, 9), bool), "full": np.ones((11, 9), bool)}
    naive = [_e_measure_matrix(prob >= j / 255, truth[case]) for j in range(256)]
    assert binary_metrics(prob, truth[case])["e_measure"] == pytest.approx(np.mean(naive), abs=1e-12)


def test_s_and_e_measure_match_an_independent_implementation():
    # Reference values from PySODMetrics 1.6.2 (Smeasure.cal_sm, and Emeasure.cal_em_with_threshold averaged over
    # t = j / 255), a separate Python port of the same MATLAB toolbox, on this map (already spanning [0, 1]).
    truth = np.zeros((6, 7), bool)
    truth[1:4, 2:6] = True
    truth[4, 5] = True
    prob = (np.arange(42).reshape(6, 7) % 9) / 8.0
    prob[truth] = np.clip(prob[truth] + 0.4, 0, 1)
    m = binary_metrics(prob, truth)
    assert m["s_measure"] == pytest.approx(0.5463902113243632, abs=1e-12)
    assert m["e_measure"] == pytest.approx(0.5445738977671077, abs=1e-12)


def test_s_measure_limits():
    rng = np.random.default_rng(2)
    truth = np.zeros((20, 30), bool)
    truth[5:12, 8:20] = True
    assert s_measure(truth.astype(float), truth) == pytest.approx(1.0)
    assert s_measure(1.0 - truth, truth) < 0.1
    prob = rng.random((20, 30))
    assert s_measure(prob, np.zeros_like(truth)) == pytest.approx(1 - prob.mean())
    assert s_measure(prob, np.ones_like(truth)) == pytest.approx(prob.mean())
    # A lesion in the last column puts the centroid there: the right-hand blocks are empty and weigh nothing.
    edge = np.zeros((8, 8), bool)
    edge[2:6, 7] = True
    assert s_measure(edge.astype(float), edge) == pytest.approx(1.0)
    assert 0.0 <= s_measure(rng.random((8, 8)), edge) <= 1.0


def test_empty_truth_and_prediction_scores_one():
    m = binary_metrics(np.zeros((4, 4)), np.zeros((4, 4), bool))
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["sensitivity"] is None and not m["present"]


def test_summarize_interval_and_dice_present():
    per_image = [binary_metrics(np.full((2, 2), p), np.array([[1, 0], [0, 0]], bool)) for p in (0.9, 0.2)]
    per_image.append(binary_metrics(np.zeros((2, 2)), np.zeros((2, 2), bool)))
    s = summarize(per_image)
    dices = np.array([0.4, 0.0, 1.0])
    assert s["dice"]["mean"] == pytest.approx(dices.mean())
    half = 1.96 * dices.std(ddof=1) / np.sqrt(3)
    assert s["dice"]["ci95"] == pytest.approx([dices.mean() - half, dices.mean() + half])
    assert s["dice_present"]["mean"] == pytest.approx(0.2) and s["dice_present"]["n"] == 2
    assert s["sensitivity"]["n"] == 2


def test_multiclass_metrics_use_argmax_labels():
    truth = np.array([[0, 1, 2, 2]])
    class_prob = np.array([[[0.8, 0.1, 0.1, 0.2]], [[0.1, 0.6, 0.5, 0.2]], [[0.1, 0.3, 0.4, 0.6]]])
    m = multiclass_metrics(class_prob, truth)
    # Labels: 0, 1, 1, 2. GGO: P = {1, 2}, G = {1}; consolidation: P = {3}, G = {2, 3}.
    assert m["ggo"]["dice"] == pytest.approx(2 / 3)
    assert m["consolidation"]["dice"] == pytest.approx(2 / 3)


@pytest.mark.skipif(not WEIGHTS.exists(), reason="needs the shipped infnet weights")
def test_evaluate_slices_known_dice(tmp_path):
    from PIL import Image

    from covfast.pipeline.infection import load_models, predict_slices

    rng = np.random.default_rng(0)
    images, masks = tmp_path / "Imgs", tmp_path / "GT"
    images.mkdir()
    masks.mkdir()
    yy, xx = np.mgrid[:96, :80]
    blob = (((yy - 40) ** 2 + (xx - 30) ** 2) < 300).astype(np.float64)
    slices = np.stack([np.clip(60 + 150 * blob + rng.normal(0, 20, blob.shape), 0, 255) for _ in range(2)])
    slices = slices.astype(np.uint8)
    for name, image in zip("ab", slices):
        Image.fromarray(image).save(images / f"{name}.jpg", quality=100)
    # Predict on the stored (JPEG-decoded) slices, as evaluate_slices will. Image a's mask is the model's own
    # thresholded prediction (Dice 1); image b's is empty (Dice 0 unless the model predicts nothing, then 1).
    stored = np.stack([np.asarray(Image.open(images / f"{n}.jpg")) for n in "ab"])
    prob, _ = predict_slices(load_models("cpu", multiclass=False), stored)
    Image.fromarray((prob[0] >= 0.5).astype(np.uint8) * 255).save(masks / "a.png")
    Image.fromarray(np.zeros(prob[1].shape, np.uint8)).save(masks / "b.png")
    expected_b = 1.0 if not (prob[1] >= 0.5).any() else 0.0
    out = tmp_path / "result.json"
    result = evaluate_slices(images, masks, task="infection", json_path=out)
    assert [e["image"] for e in result["per_image"]] == ["a.jpg", "b.jpg"]
    assert result["per_image"][0]["dice"] == pytest.approx(1.0)
    assert result["per_image"][1]["dice"] == pytest.approx(expected_b)
    assert result["dice"]["mean"] == pytest.approx((1.0 + expected_b) / 2)
    for key in ("dice", "dice_present", "dice_mean256", "iou", "sensitivity", "specificity", "mae", "s_measure"):
        assert key in result
    assert "e_measure" in result["per_image"][0]
    assert out.exists()
    # --weights: another folder's models are scored (a copy of the installed ones scores the same; none is an error).
    import shutil

    from covfast.errors import ModelNotInstalledError

    copy = tmp_path / "weights"
    copy.mkdir()
    for name in ("infnet", "infection_unet"):
        for suffix in (".safetensors", ".json"):
            if (WEIGHTS.parent / f"{name}{suffix}").exists():
                shutil.copy(WEIGHTS.parent / f"{name}{suffix}", copy / f"{name}{suffix}")
    again = evaluate_slices(images, masks, task="infection", weights_dir=copy)
    assert [e["dice"] for e in again["per_image"]] == [e["dice"] for e in result["per_image"]]
    with pytest.raises(ModelNotInstalledError):
        evaluate_slices(images, masks, task="instances", weights_dir=tmp_path / "GT")


def test_evaluate_slices_rejects_missing_folder(tmp_path):
    from covfast.errors import InputError

    with pytest.raises(InputError, match="not a folder"):
        evaluate_slices(tmp_path / "nope", tmp_path)


def test_summarize_leaves_out_metrics_older_records_lack():
    old = {"dice": 0.5, "dice_mean256": 0.4, "iou": 0.3, "sensitivity": 0.6, "specificity": 0.9, "mae": 0.1}
    new = {**old, "dice": 0.7, "s_measure": 0.8, "e_measure": 0.85}
    summary = summarize([{**old, "present": True}, {**new, "present": True}])
    assert summary["dice"]["mean"] == pytest.approx(0.6) and summary["dice"]["n"] == 2
    assert summary["s_measure"]["mean"] == pytest.approx(0.8) and summary["s_measure"]["n"] == 1


def _labels():
    labels = np.zeros((12, 10), np.uint8)
    labels[2:6, 1:4] = 1
    labels[7:10, 5:9] = 2
    return labels


def _palette_image(labels):
    from PIL import Image

    image = Image.fromarray(labels, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    return image


@pytest.mark.parametrize("form", ["palette", "rgb", "grey012"])
def test_class_masks_read_in_every_form_the_layout_allows(tmp_path, form):
    """COVID-SemiSeg's palette PNG, the same colours saved as RGB, and grey 0 / 1 / 2 all give the same labels."""
    from PIL import Image

    from covfast.evaluate import read_class_mask

    labels = _labels()
    path = tmp_path / "m.png"
    if form == "palette":
        _palette_image(labels).save(path)
    elif form == "rgb":
        _palette_image(labels).convert("RGB").save(path)
    else:
        Image.fromarray(labels).save(path)
    np.testing.assert_array_equal(read_class_mask(path), labels)


@pytest.mark.parametrize("form", ["rgb_other_colour", "grey_0_128_255"])
def test_class_masks_with_unknown_values_are_refused(tmp_path, form):
    from PIL import Image

    from covfast.errors import EXIT_BAD_INPUT, InputError
    from covfast.evaluate import read_class_mask

    labels = _labels()
    path = tmp_path / "m.png"
    if form == "rgb_other_colour":
        rgb = np.asarray(_palette_image(labels).convert("RGB")).copy()
        rgb[0, 0] = (0, 0, 255)
        Image.fromarray(rgb).save(path)
    else:
        Image.fromarray((labels * 127.5).astype(np.uint8)).save(path)
    with pytest.raises(InputError) as caught:
        read_class_mask(path)
    assert str(caught.value).startswith(f"{path}: ") and caught.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize("form", ["grey255", "grey01", "palette", "jpeg", "bilevel", "grey16"])
def test_infection_masks_read_in_common_forms(tmp_path, form):
    from PIL import Image

    from covfast.evaluate import read_infection_mask

    truth = _labels() > 0
    path = tmp_path / ("m.jpg" if form == "jpeg" else "m.png")
    if form == "palette":
        _palette_image(truth.astype(np.uint8)).save(path)
    elif form == "grey01":
        Image.fromarray(truth.astype(np.uint8)).save(path)
    elif form == "bilevel":
        Image.fromarray(truth).save(path)
    elif form == "grey16":
        Image.fromarray(truth.astype(np.uint16) * 65535).save(path)
    else:
        Image.fromarray(truth.astype(np.uint8) * 255).save(path, **({"quality": 90} if form == "jpeg" else {}))
    np.testing.assert_array_equal(read_infection_mask(path), truth)


def test_png_mask_wins_over_another_format_of_the_same_name(tmp_path):
    from PIL import Image

    from covfast.evaluate import _pairs

    images, masks = tmp_path / "Imgs", tmp_path / "GT"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(images / "a.jpg")
    for suffix in (".jpg", ".png", ".bmp"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / f"a{suffix}")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "b.png")  # no image of that name: ignored
    (masks / "notes.txt").write_text("not a mask")
    assert _pairs(images, masks) == [(images / "a.jpg", masks / "a.png")]
