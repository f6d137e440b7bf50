"""Affinity head (covfast.nn.affinity) and the diagnosis stage (covfast.pipeline.diagnosis)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covfast.nn import save_model
from covfast.nn.affinity import AffinityHead, load_head, pool_rois, select_rois
from covfast.pipeline.diagnosis import (
    MIN_INFECTED_ML,
    WEIGHTS_DIR,
    aggregate,
    aggregate_cascade,
    cascade_probs,
    class_probs,
    fallback_boxes,
    lesion_volumes,
)

TINY = {"in_ch": 5, "ch": 4, "feature_dim": 8, "affinity_dim": 8, "beta": 8, "hidden": 6, "n_blocks": 3}


def test_head_forward_backward_and_affinity_formula():
    torch.manual_seed(0)
    head = AffinityHead(**TINY)
    x = torch.randn(3, 8, 5, 28, 28, requires_grad=True)
    logits = head(x)
    assert logits.shape == (3, 3)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0 and head.affinity_matrix.grad.abs().sum() > 0
    # z = (W^T X)^T v computed here in float64 by the textbook order must match the head's path.
    head.eval()
    with torch.no_grad():
        vectors = head.vectorise(head.refine(x.flatten(0, 1))).reshape(3, 8, -1).double()
        w, v = head.affinity_matrix.double(), head.affinity_vector.double()
        z = torch.stack([(w.T @ vectors[i]).T @ v for i in range(3)])
        torch.testing.assert_close(head.classify(z.float()), head(x), rtol=1e-4, atol=1e-5)


def test_head_rejects_bad_config_and_beta():
    with pytest.raises(ValueError, match="affinity_dim"):
        AffinityHead(**{**TINY, "affinity_dim": 12})
    with pytest.raises(ValueError, match="8 RoIs"):
        AffinityHead(**TINY)(torch.zeros(1, 4, 5, 28, 28))


def test_select_rois_pads_by_repetition_and_falls_back():
    boxes = [(0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 3, 3)]
    assert select_rois(boxes, [], 8) == [boxes[i % 3] for i in range(8)]
    many = [(i, i, i + 1, i + 1) for i in range(10)]
    assert select_rois(many, [], 8) == many[:8]
    fallback = fallback_boxes(256)
    assert select_rois([], fallback, 4) == [fallback[0], fallback[1], fallback[2], fallback[0]]
    assert fallback[0] == (0.0, 0.0, 256.0, 256.0)


def test_pool_rois_whole_map_of_constant_features():
    features = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 16, 16).contiguous()
    pooled = pool_rois(features, [select_rois([], fallback_boxes(128), 8)] * 2, 1 / 8)
    assert pooled.shape == (2, 8, 3, 28, 28)
    torch.testing.assert_close(pooled[1], torch.ones(8, 3, 28, 28))
    torch.testing.assert_close(pooled[0], torch.zeros(8, 3, 28, 28))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    head = AffinityHead(**TINY).eval()
    save_model(head, tmp_path / "a.safetensors", "affinity", TINY)
    loaded = load_head(tmp_path / "a.safetensors")
    x = torch.randn(2, 8, 5, 28, 28)
    torch.testing.assert_close(loaded(x), head(x))
    save_model(head, tmp_path / "b.safetensors", "unet", TINY)
    with pytest.raises(ValueError, match="not an affinity head"):
        load_head(tmp_path / "b.safetensors")


def test_class_probs_and_aggregation_rule():
    probs = class_probs(torch.tensor([[5.0, -5.0, -5.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs[0].argmax() == 0 and np.allclose(probs[1], 1 / 3)
    normal = np.tile([0.1, 0.1, 0.8], (40, 1))
    assert aggregate(normal)["label"] == "normal"
    # 5 abnormal of 40 slices reach max(3, 10 % of 40): the abnormal slices decide.
    mixed = normal.copy()
    mixed[:5] = [0.2, 0.7, 0.1]
    result = aggregate(mixed)
    assert result["label"] == "pneumonia" and result["abnormal_slices"] == 5
    assert result["probs"]["pneumonia"] == pytest.approx(0.7)
    mixed[:3] = [0.7, 0.2, 0.1]
    assert aggregate(mixed)["label"] == "covid"
    mixed[:] = normal
    mixed[:3] = [0.7, 0.2, 0.1]
    assert aggregate(mixed)["label"] == "normal"  # 3 of 40 slices < 10 %
    # No lung slice, no call (and no NaN for report.json).
    assert aggregate(np.zeros((0, 3))) == {"label": None, "probs": None, "rule": result["rule"], "abnormal_slices": 0}


def test_cascade_probs_take_abnormality_from_the_segmentation_and_the_kind_from_the_head():
    head = np.array([[0.6, 0.2, 0.2], [0.05, 0.05, 0.9], [0.1, 0.3, 0.6], [0.0, 0.0, 1.0]])
    area = np.array([20.0, 180.0, 0.0, 60.0])
    probs = cascade_probs(head, area, 20.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # p(abnormal) = A / (A + A0): 0.5 at A0, 0.9 at 9 A0, 0 without infection, whatever the head's p(normal).
    np.testing.assert_allclose(1 - probs[:, 2], [0.5, 0.9, 0.0, 0.75])
    # The head splits the abnormal mass by p(covid) / (p(covid) + p(pneumonia)); no preference when it has none.
    np.testing.assert_allclose(probs[0, :2], [0.375, 0.125])
    np.testing.assert_allclose(probs[1, :2], [0.45, 0.45])
    np.testing.assert_allclose(probs[3, :2], [0.375, 0.375])
    with pytest.raises(ValueError, match="4 slices of head probabilities but 3"):
        cascade_probs(head, area[:3], 20.0)
    with pytest.raises(ValueError, match="positive"):
        cascade_probs(head, area, 0.0)


def test_cascade_kind_from_the_peripheral_odds_ratio():
    """kind_share replaces the head's split on every slice; pattern_share maps the odds ratio to s = OR / (1 + OR)."""
    from covfast.pipeline.diagnosis import CASCADE_RULE, HEAD_CASCADE_RULE, pattern_share

    assert pattern_share({"peripheral_odds_ratio": 3.0}) == pytest.approx(0.75)
    assert pattern_share({"peripheral_odds_ratio": 1.0}) == pytest.approx(0.5)
    assert pattern_share({"peripheral_odds_ratio": None}) is None and pattern_share(None) is None
    head = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.0, 0.0, 1.0]])
    area = np.array([180.0, 180.0, 0.0])
    probs = cascade_probs(head, area, 20.0, kind_share=0.25)  # a central pattern: pneumonia on every slice
    np.testing.assert_allclose(probs[:, 0], [0.225, 0.225, 0.0])
    np.testing.assert_allclose(probs[:, 1], [0.675, 0.675, 0.0])
    np.testing.assert_allclose(probs[:, 2], [0.1, 0.1, 1.0])
    with pytest.raises(ValueError, match="kind_share"):
        cascade_probs(head, area, 20.0, kind_share=1.5)
    call = aggregate_cascade(probs, area, infected_ml=MIN_INFECTED_ML + 1, area_mm2=20.0)
    assert call["label"] == "pneumonia" and call["rule"] == CASCADE_RULE
    by_head = aggregate_cascade(cascade_probs(head, area, 20.0), area, MIN_INFECTED_ML + 1, 20.0, rule=HEAD_CASCADE_RULE)
    assert by_head["rule"] == HEAD_CASCADE_RULE and by_head["probs"]["covid"] == pytest.approx(by_head["probs"]["pneumonia"])


def test_slice_label_decides_abnormal_first_then_the_kind():
    from covfast.pipeline.diagnosis import slice_label

    # covid, pneumonia, normal: a positive slice whose abnormal mass is split is not called normal.
    assert slice_label([0.33, 0.22, 0.45]) == "covid"
    assert slice_label([0.2, 0.3, 0.5]) == "pneumonia"  # p(normal) = 0.5 is A = A0: COVID-positive
    assert slice_label([0.3, 0.1, 0.6]) == "normal"


def test_aggregate_cascade_gates_on_infected_volume_then_types_the_positive_slices():
    area = np.zeros(40)
    area[:6] = 200.0
    head = np.tile([0.2, 0.1, 0.7], (40, 1))
    head[:6] = [0.2, 0.7, 0.1]  # the infected slices look like pneumonia to the head
    head[6:] = [0.9, 0.05, 0.05]  # the clean ones like COVID-19: they must not decide
    probs = cascade_probs(head, area, 20.0)
    result = aggregate_cascade(probs, area, infected_ml=MIN_INFECTED_ML + 1, area_mm2=20.0)
    assert result["label"] == "pneumonia" and result["abnormal_slices"] == 6
    assert result["probs"]["normal"] == pytest.approx(20.0 / 220.0)
    assert sum(result["probs"].values()) == pytest.approx(1.0)
    # Below the volume gate the scan is normal however many slices are positive; probs over all lung slices.
    small = aggregate_cascade(probs, area, infected_ml=MIN_INFECTED_ML - 1, area_mm2=20.0)
    assert small["label"] == "normal" and small["probs"]["normal"] == pytest.approx(probs[:, 2].mean())
    assert aggregate_cascade(probs, np.zeros(40), 50.0, 20.0)["label"] == "normal"  # no positive slice
    assert aggregate_cascade(np.zeros((0, 3)), np.zeros(0), 0.0, 20.0)["label"] is None


def test_lesion_volumes_counts_3d_components_inside_lung():
    prob = np.zeros((6, 20, 20), np.float32)
    lung = np.ones_like(prob, dtype=np.uint8)
    prob[0:2, 0:5, 0:5] = 0.9  # 50 voxels
    prob[4, 10:12, 10:12] = 0.7  # 4 voxels
    lung[4] = 0  # ... outside the lung
    volumes = lesion_volumes(prob, lung, (2.0, 1.0, 1.0))
    assert volumes == [pytest.approx(0.1)]
    prob[5, 19, 14:20] = 0.8  # 6 voxels on the far corner: the labelled box spans the whole volume
    prob[5, 18, 19] = 0.8  # diagonal neighbour: the same 26-connected lesion
    assert lesion_volumes(prob, lung, (2.0, 1.0, 1.0)) == [pytest.approx(0.1), pytest.approx(0.014)]
    assert lesion_volumes(np.zeros_like(prob), lung, (2.0, 1.0, 1.0)) == []


@pytest.mark.skipif(not (WEIGHTS_DIR / "affinity.safetensors").exists(), reason="affinity weights not installed")
def test_diagnose_on_sample_volume():
    from covfast.io import load_volume, sample_path
    from covfast.pipeline.diagnosis import diagnose
    from covfast.pipeline.lung import lung_mask

    volume = load_volume(sample_path())
    hu = volume.hu[30:40]
    lung = lung_mask(volume.hu, volume.spacing_mm)[30:40]
    prob = np.zeros(hu.shape, np.float32)
    prob[:, 100:120, 60:80] = 0.9
    result = diagnose(hu, lung, prob * (lung > 0), volume.spacing_mm)
    assert len(result["slices"]) == int((lung.reshape(10, -1) > 0).any(axis=1).sum()) > 0
    for entry in result["slices"]:
        assert set(entry["class_probs"]) == {"covid", "pneumonia", "normal"}
        assert sum(entry["class_probs"].values()) == pytest.approx(1.0)
    assert result["diagnosis"]["label"] in ("covid", "pneumonia", "normal")
    assert result["lesions"]["count"] == len(result["lesions"]["volumes_ml"]) >= 1
    with pytest.raises(ValueError, match="one shape"):
        diagnose(hu, lung[:5], prob, volume.spacing_mm)


def test_pool_rois_matches_roi_align_on_every_box():
    from covfast.ops import roi_align

    torch.manual_seed(2)
    features = torch.randn(2, 3, 16, 16)
    rois = [
        select_rois([(8.0, 16.0, 60.0, 100.0), (0.0, 0.0, 30.0, 20.0)], [], 8),
        select_rois([], fallback_boxes(128), 8),
    ]
    table = torch.tensor([(b, *box) for b, boxes in enumerate(rois) for box in boxes], dtype=torch.float32)
    expected = roi_align(features, table, 28, 1 / 8, sampling_ratio=2, aligned=True).reshape(2, 8, 3, 28, 28)
    torch.testing.assert_close(pool_rois(features, rois, 1 / 8), expected)


@pytest.mark.skipif(not (WEIGHTS_DIR / "affinity.safetensors").exists(), reason="affinity weights not installed")
def test_diagnose_refuses_a_head_trained_on_another_infnet(tmp_path):
    import json
    import shutil

    from covfast.errors import ModelNotInstalledError
    from covfast.pipeline.diagnosis import diagnose

    for name in ("infnet", "affinity"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", tmp_path)
    card = json.loads((tmp_path / "affinity.json").read_text())
    card["backbone"] = {"name": "infnet", "sha256": "0" * 64}
    (tmp_path / "affinity.json").write_text(json.dumps(card))
    volume = np.zeros((2, 8, 8), np.int16)
    with pytest.raises(ModelNotInstalledError, match="trained on the features"):
        diagnose(volume, volume.astype(np.uint8), volume.astype(np.float32), (1.0, 1.0, 1.0), weights_dir=tmp_path)


def test_final_card_names_the_backbone_that_made_the_cache(tmp_path):
    from training.affinity import final

    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = ["covid", "pneumonia", "normal"] * 2
    np.save(out / "cache" / "toy.npy", rng.standard_normal((6, 8, 65, 28, 28)).astype(np.float16))
    meta = {"patient": "toy", "cls": classes, "scored": [True] * 6, "slice": list(range(6)), "lesions": [1] * 6}
    (out / "cache" / "toy.json").write_text(json.dumps(meta))
    candidate = tmp_path / "candidate"
    (out / "cache_backbone.json").write_text(
        json.dumps({"name": "infnet", "sha256": "ab" * 32, "weights": str(candidate / "infnet.safetensors")})
    )
    recipe = json.loads((Path(__file__).resolve().parents[1] / "training/recipes/affinity.json").read_text())
    recipe["optim"].update(steps=2, batch=4)
    final(out, recipe, "training/recipes/affinity.json", ship=False)
    card = json.loads((out / "affinity.json").read_text())
    assert card["backbone"] == {"name": "infnet", "sha256": "ab" * 32}
    assert f"--weights {candidate}" in card["command"]
    assert card["data"] == {"toy": 6} and (out / "affinity.safetensors").exists()


# --- classification branch with its own feature stages (recipes with "joint") ---

OWN = {**TINY, "in_ch": 9, "features": [4, 8]}


def test_own_feature_stages_copy_from_a_backbone_and_preprocess():
    from covfast.nn.backbone import ResNetBackbone

    torch.manual_seed(3)
    backbone = ResNetBackbone(1, (4, 8, 16, 16)).eval()
    head = AffinityHead(**OWN).eval()
    head.copy_features(backbone)
    x = torch.randn(2, 1, 64, 64)
    stages = head.features
    torch.testing.assert_close(stages.stages[1](stages.stages[0](stages.stem(x))), backbone(x)[2])
    # covfast preprocessing passes the standardised view through; paper standardises HU by the global statistics.
    assert head.feature_input(x, None) is x
    paper = AffinityHead(**{**OWN, "preprocess": "paper", "input_mean": -500.0, "input_std": 250.0})
    hu = torch.full((1, 1, 8, 8), -250.0)
    torch.testing.assert_close(paper.feature_input(x, hu), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="HU view"):
        AffinityHead(**{**OWN, "preprocess": "paper"}).feature_input(x, hu)
    with pytest.raises(ValueError, match="own feature stages"):
        AffinityHead(**{**TINY, "preprocess": "paper"})
    with pytest.raises(ValueError, match="preprocess"):
        AffinityHead(**{**OWN, "preprocess": "imagenet"})
    with pytest.raises(ValueError, match="no feature stages"):
        AffinityHead(**TINY).copy_features(backbone)


def test_own_feature_stages_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    config = {**OWN, "preprocess": "paper", "input_mean": -400.0, "input_std": 300.0}
    head = AffinityHead(**config).eval()
    save_model(head, tmp_path / "h.safetensors", "affinity", config)
    loaded = load_head(tmp_path / "h.safetensors")
    assert (loaded.preprocess, loaded.input_mean, loaded.input_std) == ("paper", -400.0, 300.0)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def _toy_infnet():
    from types import SimpleNamespace

    from covfast.nn import build_model

    torch.manual_seed(5)
    model = build_model("infnet", in_ch=1, widths=[8, 8, 16, 16], ch=8, ra_ch=8).eval()
    return SimpleNamespace(model=model)


def test_joint_branch_with_copied_stages_sees_the_cached_features():
    """With the segmentation weights just copied in, the classification branch (views -> own stages -> RoIs) pools
    the RoI features cached from the Inf-Net's backbone: one input, two paths."""
    from covfast.pipeline.diagnosis import RoiFeatures
    from training.affinity import _roi_batch, _unwindow, joint_rois, predict_joint

    infnet = _toy_infnet()
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (300, 280), dtype=np.uint8) for _ in range(3)]
    batch = _roi_batch(infnet, RoiFeatures(infnet.model.backbone), views, _unwindow(views))
    assert batch["x"].shape == batch["hu"].shape == batch["prob"].shape == (3, 256, 256)
    assert batch["boxes"].shape == (3, 8, 4) and len(batch["lesions"]) == 3
    cached = torch.from_numpy(batch["feats"].astype(np.float32))
    head = AffinityHead(**{**TINY, "in_ch": 9, "features": [8, 8]}).eval()
    with torch.no_grad():
        before = joint_rois(head, batch, np.arange(3))
        head.copy_features(infnet.model.backbone)
        after = joint_rois(head, batch, np.arange(3))
    assert after.shape == cached.shape
    # x, prob and the cached features are stored as float16: agreement to float16 rounding, not before the copy.
    scale = float(cached.abs().max())
    assert float((after - cached).abs().max()) < 2e-3 * scale < float((before - cached).abs().max())
    probs = predict_joint(head, batch, np.array([2, 0]))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # HU of an 8-bit lung-window view: 0 -> the window's floor, 255 -> its ceiling.
    hu = _unwindow([np.array([[0, 255]], np.uint8).repeat(2, 0)])
    assert hu.min() == pytest.approx(-1000.0) and hu.max() == pytest.approx(200.0)


@pytest.mark.skipif(not (WEIGHTS_DIR / "affinity.safetensors").exists(), reason="affinity weights not installed")
@pytest.mark.parametrize("preprocess", ["covfast", "paper"])
def test_diagnose_with_a_head_that_owns_its_feature_stages(tmp_path, preprocess):
    """The shipped head given feature stages copied from the shipped Inf-Net's backbone must diagnose as the shipped
    head does (covfast preprocessing); with paper preprocessing the same code path reads the HU views."""
    import shutil

    from covfast.io import load_volume, sample_path
    from covfast.nn import sha256_file
    from covfast.pipeline.diagnosis import diagnose, load_affinity
    from covfast.pipeline.infection import SINGLE_CLASS, load_models
    from covfast.pipeline.lung import lung_mask

    shipped, card = load_affinity()
    config = {**card["architecture"]["config"], "features": [32, 64], "preprocess": preprocess}
    if preprocess == "paper":
        config.update(input_mean=-600.0, input_std=450.0)
    head = AffinityHead(**config).eval()
    head.load_state_dict({**head.state_dict(), **shipped.state_dict()})
    head.copy_features(load_models("cpu", multiclass=False)[SINGLE_CLASS].model.backbone)
    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / f"infnet{suffix}", tmp_path)
    save_model(head, tmp_path / "affinity.safetensors", "affinity", config)
    (tmp_path / "affinity.json").write_text(
        json.dumps({**card, "sha256": sha256_file(tmp_path / "affinity.safetensors")})
    )

    volume = load_volume(sample_path())
    hu, lung = volume.hu[30:36], lung_mask(volume.hu, volume.spacing_mm)[30:36]
    prob = np.zeros(hu.shape, np.float32)
    prob[:, 100:120, 60:80] = 0.9
    prob *= lung > 0
    mine = diagnose(hu, lung, prob, volume.spacing_mm, weights_dir=tmp_path)
    table = np.array([list(s["class_probs"].values()) for s in mine["slices"]])
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    ref = diagnose(hu, lung, prob, volume.spacing_mm)
    expected = np.array([list(s["class_probs"].values()) for s in ref["slices"]])
    if preprocess == "covfast":
        np.testing.assert_allclose(table, expected, atol=1e-4)
    else:  # the stages read standardised HU, not the lung-window view: other features, other probabilities
        assert np.abs(table - expected).max() > 1e-3


AFFINITY_RECIPES = sorted((Path(__file__).resolve().parents[1] / "training" / "recipes").glob("affinity*.json"))


@pytest.mark.parametrize("path", AFFINITY_RECIPES, ids=[p.stem for p in AFFINITY_RECIPES])
def test_affinity_recipes_build_their_head(path):
    recipe = json.loads(path.read_text())
    config = dict(recipe["model"])
    if config.get("preprocess") == "paper":  # measured on the training views at train time
        config.update(input_mean=-400.0, input_std=400.0)
    head = AffinityHead(**config)
    # A head with its own stages is trained by the alternating schedule, which needs its "joint" block.
    assert (head.features is not None) == ("joint" in recipe)
    if "joint" in recipe:
        assert {"rounds", "seg_steps", "seg_batch", "seg_lr", "cls_steps", "features_lr"} <= recipe["joint"].keys()
    for key in ("batch", "lr", "weight_decay"):
        assert recipe["optim"][key] > 0



def test_diagnosis_cascade_check_scores_both_rules_on_held_out_predictions():
    """training/analysis/diagnosis_cascade.py: the head's held-out predictions (lopo.json) against the reports'
    infected areas; a normal patient whose head calls every slice covid is rescued by the segmentation."""
    from training.analysis.diagnosis_cascade import evaluate, segmentation_flags

    def volume(truth, probs, cls, scored, areas, infected_ml):
        pred = {"slice": list(range(len(probs))), "cls": cls, "scored": scored, "probs": probs}
        report = {
            "infected_volume_ml": {"total": infected_ml},
            "slices": [
                {"index": z, "z_mm": 2.0 * z, "lung_area_mm2": 1e4, "infected_area_mm2": a, "covid_positive": a >= 20}
                for z, a in enumerate(areas)
            ],
        }
        return truth, pred, report

    cases = {
        "P001": volume("covid", [[0.8, 0.1, 0.1]] * 4, ["covid"] * 3 + ["normal"], [True] * 3 + [False],
                       [100.0, 100.0, 0.0, 0.0], 50.0),
        "normal001": volume("normal", [[0.8, 0.1, 0.1]] * 4, ["normal"] * 4, [True] * 4, [0.0, 30.0, 0.0, 0.0], 2.0),
    }
    lopo = {
        "predictions": {case: pred for case, (_, pred, _) in cases.items()},
        "volumes": {case: {"truth": truth} for case, (truth, _, _) in cases.items()},
    }
    reports = {case: report for case, (_, _, report) in cases.items()}
    result = evaluate(lopo, reports, area_mm2=20.0, min_infected_ml=10.0)
    assert result["head"]["volumes_right"] == 1 and result["cascade"]["volumes_right"] == 2
    assert result["volumes"]["normal001"]["head"]["label"] == "covid"
    assert result["volumes"]["normal001"]["cascade"]["label"] == "normal"
    # Scored slices: P001's 3 infected (2 found, 1 called normal), normal001's 4 (3 normal, 1 positive -> covid).
    assert result["cascade"]["slices"]["confusion"] == [[2, 0, 1], [0, 0, 0], [1, 0, 3]]
    assert "pattern" not in result  # the reports carry no distribution
    # With the reports' peripheral odds ratio, the pattern rule types P001 by it alone: a central pattern -> pneumonia.
    reports["P001"]["distribution"] = {"peripheral_odds_ratio": 0.5}
    reports["normal001"]["distribution"] = {"peripheral_odds_ratio": 4.0}
    result = evaluate(lopo, reports, area_mm2=20.0, min_infected_ml=10.0)
    assert result["volumes"]["P001"]["pattern"]["label"] == "pneumonia"
    assert result["volumes"]["P001"]["pattern_share"] == pytest.approx(1 / 3)
    assert result["volumes"]["normal001"]["pattern"]["label"] == "normal"  # the 10 mL gate still decides
    assert result["pattern"]["slices"]["confusion"] == [[0, 2, 1], [0, 0, 0], [1, 0, 3]]
    # By the per-slice class (abnormal first, then the kind) the same slices score the same here: each positive slice
    # holds A = 5 A0, so its pneumonia share 2/3 x 5/6 beats normal's 1/6 under argmax as well.
    assert result["pattern"]["slices_class"]["confusion"] == [[0, 2, 1], [0, 0, 0], [1, 0, 3]]
    # blend: P001's share is the mean of the head's 0.8 / 0.9 and the pattern's 1/3, 0.61 -> covid.
    assert result["volumes"]["P001"]["blend"]["label"] == "covid" and result["blend"]["volumes_right"] == 2
    labels = {
        case: {"slice_location_mm": [2.0 * z for z in range(4)], "infection_slice_labels": lab}
        for case, lab in (("P001", [0, 1, 1, 1]), ("normal001", [0, 0, 0, 0]))  # labels.json order: superior first
    }
    flags = segmentation_flags(reports, labels)
    assert flags["P001"] == {"slices": 4, "sensitivity": pytest.approx(2 / 3), "specificity": 1.0}
    assert flags["normal001"] == {"slices": 4, "sensitivity": None, "specificity": 0.75}


def test_load_cache_drops_patient_level_slices_without_a_lesion(tmp_path):
    """CC-CCII and Zenodo slices carry only their patient's class: kept only where a lesion instance was found."""
    from training.affinity import load_cache

    (tmp_path / "cache").mkdir()
    sources = {
        "infnet": ("medseg", ["covid", "covid"], [0, 1]),
        "zenodo": ("zenodo", ["covid"] * 3, [0, 2, 1]),
        "ccccii_1": ("ccccii", ["pneumonia"] * 2, [1, 0]),
    }
    for name, (patient, cls, lesions) in sources.items():
        feats = np.arange(len(cls), dtype=np.float16).reshape(-1, 1) * np.ones((1, 4), np.float16)
        np.save(tmp_path / "cache" / f"{name}.npy", feats)
        meta = {"patient": patient, "cls": cls, "scored": [False] * len(cls), "slice": list(range(len(cls))),
                "lesions": lesions}
        (tmp_path / "cache" / f"{name}.json").write_text(json.dumps(meta))
    feats, rows = load_cache(tmp_path)
    kept = [(r["source"], r["slice"]) for r in rows]
    assert kept == [("ccccii_1", 0), ("infnet", 0), ("infnet", 1), ("zenodo", 1), ("zenodo", 2)]
    np.testing.assert_array_equal(feats[:, 0], [0, 0, 1, 1, 2])
