"""Training layer: losses, augmentation, folds, weight transfer, loops (tiny, CPU), checkpoint resume, recipes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covfast.nn import build_model, save_model
from training.augment import AugmentConfig, augment
from training.check_volumes import slice_flag_scores
from training.data import SliceSet, cv_folds
from training.loops import OptimConfig, predict, train_inpainting, train_segmentation
from training.losses import box_mean, edge_target, lovasz_hinge, multiclass_loss, structure_loss
from training.negatives import clean_slices
from training.recipes import _with_negatives, init_from, load_recipe

# Recipes of `python -m training run`; affinity*.json belong to training/affinity*.py and have their own format.
RECIPES = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*.json")
    if not p.stem.startswith("affinity")
)
TINY_INFNET = {"in_ch": 1, "widths": [8, 8, 16, 16], "ch": 8, "ra_ch": 8}
TINY_RESUNET = {"in_ch": 1, "out_ch": 1, "widths": [8, 8, 16, 16], "blocks": 1}


def _square(size=32):
    mask = torch.zeros(1, 1, size, size)
    mask[..., 8:20, 10:24] = 1
    return mask


def test_structure_loss_prefers_the_truth():
    target = _square()
    valid = torch.ones_like(target)
    good = structure_loss((target * 2 - 1) * 8, target, valid)
    bad = structure_loss((1 - target * 2) * 8, target, valid)
    assert good < 0.05
    assert bad > 1.0


def test_structure_loss_ignores_invalid_pixels():
    target = _square()
    logits = (target * 2 - 1) * 8
    logits[..., :4, :] = 8.0  # wrong where valid = 0
    valid = torch.ones_like(target)
    valid[..., :4, :] = 0
    assert structure_loss(logits, target, valid) == pytest.approx(
        float(structure_loss((target * 2 - 1) * 8, target, torch.ones_like(target))), abs=1e-3
    )


def test_lovasz_hinge_is_the_jaccard_loss_on_unit_errors():
    """At hinge errors of exactly 0 or 1 the Lovasz extension equals the Jaccard loss of the mispredicted pixels:
    (false negatives + false positives) / (target + false positives)."""
    generator = torch.Generator().manual_seed(3)
    truth = (torch.rand(2, 1, 12, 12, generator=generator) > 0.6).float()
    wrong = (torch.rand(2, 1, 12, 12, generator=generator) > 0.8).float()
    logits = (2 * truth - 1) * (1 - wrong)  # hinge error 1 - logit * sign = wrong
    loss = lovasz_hinge(logits, truth, torch.ones_like(truth))
    fn, fp = (wrong * truth).sum(dim=(1, 2, 3)), (wrong * (1 - truth)).sum(dim=(1, 2, 3))
    expected = ((fn + fp) / (truth.sum(dim=(1, 2, 3)) + fp)).mean()
    assert torch.allclose(loss, expected)
    # Ignored pixels do not count; a confident, right map scores 0.
    assert float(lovasz_hinge(logits, truth, 1 - wrong)) == 0.0
    assert float(lovasz_hinge((2 * truth - 1) * 4, truth, torch.ones_like(truth))) == 0.0


def test_edge_target_is_the_boundary_band():
    edge = edge_target(_square(), width=1)
    assert edge[0, 0, 14, 16] == 0 and edge[0, 0, 8, 16] == 1 and edge[0, 0, 7, 16] == 1 and edge[0, 0, 0, 0] == 0


def test_multiclass_loss_prefers_the_truth():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, 2:6, 2:6] = 1
    labels[:, 9:12, 9:12] = 2
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    valid = torch.ones(1, 1, 16, 16)
    assert multiclass_loss(onehot * 10, onehot, valid) < multiclass_loss(onehot.flip(1) * 10, onehot, valid)


def test_augment_shapes_cutout_and_onehot():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 32, 32)
    y = torch.nn.functional.one_hot(torch.randint(3, (6, 32, 32)), 3).permute(0, 3, 1, 2).float()
    cfg = AugmentConfig(cutout_p=1.0, cutout_fractions=(0.2,))
    xa, ya, valid = augment(x, y, cfg, gen)
    assert xa.shape == x.shape and ya.shape == y.shape and valid.shape == (6, 1, 32, 32)
    torch.testing.assert_close(ya.sum(dim=1), torch.ones(6, 32, 32))
    erased = 1 - valid.mean(dim=(1, 2, 3))
    assert ((erased > 0.1) & (erased < 0.3)).all()
    assert (xa * (1 - valid)).abs().sum() == 0


def test_augment_intensity_touches_only_the_image_channel():
    x = torch.rand(6, 2, 32, 32)
    y = (torch.rand(6, 1, 32, 32) > 0.7).float()
    base = {"cutout_p": 0.0}
    plain = augment(x, y, AugmentConfig(**base), torch.Generator().manual_seed(1))
    strong = AugmentConfig(**base, intensity_p=1.0, brightness=0.3, contrast=0.3, gamma=0.5, blur_sigma=1.5,
                           noise_std=0.05)
    xa, ya, _ = augment(x, y, strong, torch.Generator().manual_seed(1))
    # The geometry is drawn first, so targets and the prior channel are those of the plain run.
    torch.testing.assert_close(ya, plain[1])
    torch.testing.assert_close(xa[:, 1:], plain[0][:, 1:])
    assert (xa[:, 0] - plain[0][:, 0]).abs().mean() > 0.01
    assert xa.min() >= 0 and xa.max() <= 1


def test_augment_blur_smooths_and_keeps_the_mean():
    from training.augment import _gaussian_blur

    x = torch.rand(3, 1, 40, 40)
    blurred = _gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]))
    stds = blurred.std(dim=(1, 2, 3))
    assert stds[0] > stds[1] > stds[2] and stds[0] < x.std()
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)


def test_augment_zoom_out_pads_with_air():
    x = torch.ones(4, 1, 32, 32)
    y = torch.ones(4, 1, 32, 32)
    cfg = AugmentConfig(flip=False, rotate_deg=0.0, crop_min=2.0, scale_max=2.0, cutout_p=0.0)
    xa, ya, _ = augment(x, y, cfg, torch.Generator().manual_seed(0))
    # At scale 2 the slice fills half of each side; the rest is 0 in the image and in the target.
    for t in (xa, ya):
        filled = (t > 0.5).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(filled, torch.full((4,), 0.25), atol=0.05, rtol=0)


def test_cv_folds_partition():
    folds = cv_folds(50, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(50))
    assert [len(f) for f in folds] == [10] * 5
    assert not np.array_equal(folds[0], cv_folds(50, 5, seed=1)[0])


def test_init_from_copies_backbone_and_widens_first_conv(tmp_path):
    source = build_model("resunet", **TINY_RESUNET)
    path = tmp_path / "pre.safetensors"
    save_model(source, path, "resunet", TINY_RESUNET)
    infnet = build_model("infnet", **TINY_INFNET)
    copied = init_from(infnet, path, "backbone.")
    assert copied == len([k for k in source.state_dict() if k.startswith("backbone.")])
    torch.testing.assert_close(infnet.backbone.stem[0][0].weight, source.backbone.stem[0][0].weight)
    two_channel = build_model("resunet", **{**TINY_RESUNET, "in_ch": 2, "out_ch": 3})
    init_from(two_channel, path, "")
    stem = two_channel.backbone.stem[0][0].weight
    torch.testing.assert_close(stem[:, :1], source.backbone.stem[0][0].weight)
    assert stem[:, 1:].abs().sum() == 0


def test_train_segmentation_overfits_and_resumes(tmp_path):
    torch.manual_seed(0)
    images = (_square().repeat(2, 1, 1, 1) * 200 + 20).to(torch.uint8)
    targets = _square().repeat(2, 1, 1, 1).to(torch.uint8)
    model = build_model("infnet", **TINY_INFNET)
    opt = OptimConfig(steps=30, batch=2, lr=1e-2, warmup=2, ckpt_every=10)
    log = train_segmentation(
        model,
        images,
        targets,
        "infection",
        opt,
        None,
        torch.device("cpu"),
        0,
        ckpt_path=tmp_path / "ckpt.pt",
        log_every=5,
    )
    losses = [v for v in log.losses if not np.isnan(v)]
    assert losses[-1] < 0.9 * losses[0]
    prob = predict(model, images, "infection")
    assert prob.shape == (2, 1, 32, 32) and prob[0, 0, 14, 16] > prob[0, 0, 28, 2]
    # A rerun finds the final checkpoint and does no further steps: weights stay identical.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = train_segmentation(
        model, images, targets, "infection", opt, None, torch.device("cpu"), 0, ckpt_path=tmp_path / "ckpt.pt"
    )
    assert again.losses == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize("size", [3, 31])
def test_box_mean_is_avg_pool_with_counted_zero_padding(size):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 45, 38)
    expected = torch.nn.functional.avg_pool2d(x, size, stride=1, padding=size // 2)
    torch.testing.assert_close(box_mean(x, size), expected, atol=1e-6, rtol=0)


def test_cpu_bf16_training_learns_and_returns_a_float32_contiguous_model(tmp_path):
    """optim.cpu_bf16: the forward runs in bfloat16 on the CPU, the weights stay float32, and the trained model
    comes back in the default memory format, so it saves and exports like an fp32-trained one."""
    from training.loops import _autocast

    opt = OptimConfig(steps=30, batch=2, lr=1e-2, warmup=2, ckpt_every=100, cpu_bf16=True)
    with _autocast(torch.device("cpu"), opt):
        assert torch.nn.Conv2d(1, 1, 3)(torch.rand(1, 1, 8, 8)).dtype == torch.bfloat16
    with _autocast(torch.device("cpu"), OptimConfig()):
        assert torch.nn.Conv2d(1, 1, 3)(torch.rand(1, 1, 8, 8)).dtype == torch.float32
    torch.manual_seed(0)
    images = (_square().repeat(2, 1, 1, 1) * 200 + 20).to(torch.uint8)
    targets = _square().repeat(2, 1, 1, 1).to(torch.uint8)
    model = build_model("infnet", **TINY_INFNET)
    log = train_segmentation(model, images, targets, "infection", opt, None, torch.device("cpu"), 0, log_every=5)
    losses = [v for v in log.losses if not np.isnan(v)]
    assert losses[-1] < 0.9 * losses[0]
    for value in model.state_dict().values():
        assert value.dtype in (torch.float32, torch.int64) and value.is_contiguous()
    prob = predict(model, images, "infection")
    assert prob.dtype == torch.float32 and prob[0, 0, 14, 16] > prob[0, 0, 28, 2]
    save_model(model, tmp_path / "m.safetensors", "infnet", TINY_INFNET)


def test_ema_returns_the_average_and_keeps_the_last_weights(tmp_path):
    torch.manual_seed(0)
    images = (_square().repeat(2, 1, 1, 1) * 200 + 20).to(torch.uint8)
    targets = _square().repeat(2, 1, 1, 1).to(torch.uint8)
    model = build_model("unet", in_ch=1, out_ch=1, base=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = OptimConfig(steps=20, batch=2, lr=1e-2, warmup=2, ckpt_every=10, ema=0.9)
    log = train_segmentation(
        model, images, targets, "infection", opt, None, torch.device("cpu"), 0, ckpt_path=tmp_path / "c.pt"
    )
    averaged = model.state_dict()
    key = next(k for k, v in averaged.items() if v.is_floating_point() and v.dim() == 4)
    raw, first = log.raw_state[key], start[key]
    # The average lies between the start and the last weights, nearer the last (decay 0.9 over 20 steps).
    assert not torch.equal(averaged[key], raw)
    assert (averaged[key] - raw).norm() < (first - raw).norm()
    # Resuming the finished run restores the average from the checkpoint.
    again = build_model("unet", in_ch=1, out_ch=1, base=4)
    log2 = train_segmentation(
        again, images, targets, "infection", opt, None, torch.device("cpu"), 0, ckpt_path=tmp_path / "c.pt"
    )
    torch.testing.assert_close(again.state_dict()[key], averaged[key])
    torch.testing.assert_close(log2.raw_state[key], raw)


def test_cli_cpu_bf16_is_recorded_in_the_recipe(tmp_path, monkeypatch):
    from training import recipes

    seen = {}
    monkeypatch.setattr(recipes, "run_segment", lambda recipe, *a: seen.setdefault("recipe", recipe))
    recipes.run_recipe(RECIPES[0].parent / "unet_long_aug.json", tmp_path, tmp_path, "cpu", 0, [], False, True)
    assert seen["recipe"]["optim"]["cpu_bf16"] is True and seen["recipe"]["optim"]["steps"] == 1000


def test_train_inpainting_with_coach_updates_both():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8)
    net = build_model("resunet", **TINY_RESUNET)
    coach = build_model("resunet", **TINY_RESUNET)
    coach_before = [p.clone() for p in coach.parameters()]
    net_before = [p.clone() for p in net.parameters()]
    train_inpainting(
        net,
        images,
        OptimConfig(steps=2, batch=2, warmup=1),
        torch.device("cpu"),
        0,
        coach=coach,
        steps_coach=2,
        steps_alt=2,
        log_every=1,
    )
    assert any(not torch.equal(a, b) for a, b in zip(coach_before, coach.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(net_before, net.parameters()))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_build(path):
    recipe = load_recipe(path)
    assert recipe["kind"] in ("pretrain", "segment")
    build_model(recipe["model"]["arch"], **recipe["model"].get("config", {}))
    if recipe.get("init"):
        assert (path.parent / f"{recipe['init']['run']}.json").exists()
    json.dumps(recipe)


def test_clean_slices_keep_a_gap_from_labelled_slices():
    z = np.arange(10)
    labels = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    assert clean_slices(z, labels, 0).tolist() == (labels == 0).tolist()
    assert np.flatnonzero(clean_slices(z, labels, 2)).tolist() == [0, 1, 8, 9]
    assert clean_slices(z, np.zeros(10, int), 5).all()


def test_with_negatives_weights_follow_the_mix():
    labelled = SliceSet(
        ["a", "b"], torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.ones(2, 1, 4, 4, dtype=torch.uint8)
    )
    clean = SliceSet(
        ["n1", "n2", "n3", "n4"], torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    )
    merged, weights = _with_negatives(labelled, {"ctmd": clean}, {"labelled": 0.6, "ctmd": 0.4})
    assert merged.names == ["a", "b", "n1", "n2", "n3", "n4"]
    assert merged.targets[:2].eq(255).all() and merged.targets[2:].eq(0).all()
    assert weights[:2].sum() == pytest.approx(0.6) and weights[2:].sum() == pytest.approx(0.4)


def test_train_segmentation_draws_only_weighted_slices():
    from covfast.nn.preprocess import PIXEL_MEAN, PIXEL_STD

    class Recorder(torch.nn.Module):
        """A 1x1 convolution that records which slices it is fed (slice i is filled with the value 40 * i)."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            self.seen: list[int] = []

        def forward(self, x):
            level = x.mean(dim=(1, 2, 3)) * PIXEL_STD + PIXEL_MEAN  # undo the standardisation -> [0, 1]
            self.seen += (level * 255 / 40).round().long().tolist()
            return self.conv(x)

    images = torch.arange(4, dtype=torch.uint8).mul(40).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    targets = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    model = Recorder()
    opt = OptimConfig(steps=30, batch=4, lr=1e-3, warmup=2, ckpt_every=100)
    train_segmentation(model, images, targets, "infection", opt, None, torch.device("cpu"), 0, log_every=100,
                       sample_weights=torch.tensor([0.0, 0.0, 1.0, 3.0]))
    assert len(model.seen) == 30 * 4
    assert set(model.seen) == {2, 3}  # never a slice of weight 0, both weighted ones
    assert model.seen.count(3) > model.seen.count(2)  # drawn in proportion to the weights (3:1)


def test_slice_flag_scores_hand_computed():
    area = np.array([0.0, 30.0, 150.0, 600.0, 10.0])
    truth = np.array([False, False, True, True, True])
    scores = slice_flag_scores(area, truth, 20.0)
    assert scores == {"sensitivity": 2 / 3, "specificity": 0.5, "flagged": 3, "false_positive_slices": 1}
    assert slice_flag_scores(area, np.zeros(5, bool), 100.0)["sensitivity"] is None


def test_ship_fold_model_writes_a_card_with_its_validation(tmp_path):
    from covfast.nn import sha256_file
    from training.ship import ship

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = {"model": {"arch": "infnet", "config": TINY_INFNET}, "negatives": {"mix": {"labelled": 1.0}}}
    save_model(build_model("infnet", **TINY_INFNET), run_dir / "fold0.safetensors", "infnet", TINY_INFNET)
    from covfast.evaluate import METRICS

    per_image = [
        {"image": str(i), **dict.fromkeys(METRICS, 0.5), "dice": d, "present": True} for i, d in enumerate([0.6, 0.8])
    ]
    fold = {"recipe": recipe, "device": "cpu", "fold": 0, "seconds": 3.0, "val": ["0", "1"], "per_image": per_image}
    (run_dir / "fold0.json").write_text(json.dumps(fold))
    volumes = {"normal001": {"diagnosis": "Normal", "slice_flags": {"100.0": {"specificity": 0.9}}}}
    (tmp_path / "volumes.json").write_text(json.dumps(volumes))
    card = ship(run_dir, "infnet", "infection", "cmd", tmp_path / "weights", "fold0", tmp_path / "volumes.json")
    assert card["sha256"] == sha256_file(tmp_path / "weights" / "infnet.safetensors")
    assert json.loads((tmp_path / "weights" / "infnet.json").read_text()) == card
    assert card["validation"]["metrics"]["dice"]["mean"] == pytest.approx(0.7)
    assert card["validation"]["covid_ct_md_slice_flags"]["normal001"]["100.0"]["specificity"] == 0.9
    assert "P001" in card["data"] and card["training"]["fit_seconds"] == 3.0

    # A later check-volumes run replaces only the slice flags; the weights' SHA-256 stays.
    volumes["normal001"]["slice_flags"]["100.0"]["specificity"] = 0.95
    (tmp_path / "volumes2.json").write_text(json.dumps(volumes))
    from training.__main__ import main

    card_path = tmp_path / "weights" / "infnet.json"
    assert main(["card-slice-flags", str(card_path), str(tmp_path / "volumes2.json"), "--what", "ensemble"]) == 0
    updated = json.loads(card_path.read_text())
    assert updated["validation"]["covid_ct_md_slice_flags"]["normal001"]["100.0"]["specificity"] == 0.95
    assert updated["validation"]["covid_ct_md_slice_flags"]["protocol"].endswith("; ensemble")
    assert updated["sha256"] == card["sha256"] and updated["validation"]["metrics"] == card["validation"]["metrics"]

def test_ship_partner_card_keeps_the_ensembles_out_of_fold_scores(tmp_path):
    from training.ship import ship

    config = {"in_ch": 1, "out_ch": 1, "base": 4}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_model(build_model("unet", **config), run_dir / "final.safetensors", "unet", config)
    recipe = {"model": {"arch": "unet", "config": config}}
    (run_dir / "final.json").write_text(json.dumps({"recipe": recipe, "device": "cpu", "final_seconds": 5.0}))
    check = {"folds": "0,1", "tta": "h", "models": {"infnet": "a{k}", "unet": "b{k}"}, "command": "python x",
             "pooled": {"infnet": {"dice": 0.70}, "infnet+unet": {"dice": 0.72}, "infnet+unet@0.3": {"dice": 0.69}}}
    (tmp_path / "ensemble.json").write_text(json.dumps(check))
    card = ship(run_dir, "infection_unet", "infection", "cmd", tmp_path / "weights",
                ensemble_check=tmp_path / "ensemble.json")
    ensemble = card["validation"]["ensemble"]
    assert ensemble["pooled"] == {"infnet": {"dice": 0.70}, "infnet+unet": {"dice": 0.72}}
    assert ensemble["command"] == "python x" and ensemble["tta"] == "h"
    assert card["architecture"]["arch"] == "unet" and (tmp_path / "weights" / "infection_unet.safetensors").exists()


def test_fold_summary_pools_multiclass_folds(tmp_path):
    from covfast.evaluate import METRICS
    from training.ship import fold_summary

    def image(name, ggo_dice, consolidation_present):
        ggo = {**dict.fromkeys(METRICS, 0.5), "dice": ggo_dice, "present": True}
        consolidation = {**dict.fromkeys(METRICS, 0.5), "dice": 0.2, "present": consolidation_present}
        return {"image": name, "ggo": ggo, "consolidation": consolidation}

    assert fold_summary(tmp_path, "multiclass") is None
    for k, per_image in ((0, [image("a", 0.4, True)]), (2, [image("b", 0.6, False), image("c", 0.8, False)])):
        fold = {"fold": k, "seconds": 10.0, "model": "resunet", "per_image": per_image}
        (tmp_path / f"fold{k}.json").write_text(json.dumps(fold))
    pooled = fold_summary(tmp_path, "multiclass")
    assert pooled["folds"] == [0, 2] and pooled["slices"] == 3 and pooled["seconds"] == 20.0
    assert pooled["metrics"]["ggo"]["dice"]["mean"] == pytest.approx(0.6)
    assert pooled["metrics"]["consolidation"]["dice_present"]["n"] == 1


def test_class_areas_inside_the_lungs():
    from training.check_volumes import _class_areas

    classes = np.array([[[0, 1, 1, 2], [2, 2, 0, 1]]], np.uint8)
    lung = np.array([[[1, 1, 1, 1], [1, 1, 1, 0]]], np.uint8)
    areas = _class_areas(classes, lung, 0.5)
    assert areas == {"ggo_mm2": 1.0, "consolidation_mm2": 1.5, "consolidation_share": pytest.approx(0.6)}
    assert _class_areas(None, lung, 0.5) == {}


def test_ship_final_without_cv_names_its_prior_and_cv_runs(tmp_path):
    from training.ship import ship

    config = {**TINY_RESUNET, "in_ch": 2, "out_ch": 3}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = {"model": {"arch": "resunet", "config": config}, "prior": {"run": "infnet_v2_shipped"}}
    save_model(build_model("resunet", **config), run_dir / "final.safetensors", "resunet", config)
    (run_dir / "final.json").write_text(json.dumps({"recipe": recipe, "device": "cpu", "final_seconds": 5.0}))
    card = ship(run_dir, "infnet_multiclass", "multiclass", "cmd", tmp_path / "weights", cv_runs=(run_dir,))
    assert card["validation"]["metrics"] is None and "no complete" in card["validation"]["protocol"]
    assert card["validation"]["cv_runs"] == [None]
    assert "Second input channel" in card["data"] and "pretraining" not in card["data"]
    assert card["input"]["channels"] == 2 and card["training"]["fit_seconds"] == 5.0


def test_ship_card_names_pretraining_only_when_the_init_chain_has_a_pretrain_run(tmp_path):
    from training.ship import ship

    def run(name, recipe, seconds):
        (tmp_path / name).mkdir()
        save_model(build_model("infnet", **TINY_INFNET), tmp_path / name / "final.safetensors", "infnet", TINY_INFNET)
        full = {"model": {"arch": "infnet", "config": TINY_INFNET}, **recipe}
        (tmp_path / name / "final.json").write_text(json.dumps({"recipe": full, "device": "cpu", "final_seconds": seconds}))
        return tmp_path / name

    run("stage1", {"kind": "segment"}, 1000.0)
    card = ship(run("stage2", {"kind": "segment", "init": {"run": "stage1"}}, 50.0), "infnet", "infection", "cmd",
                tmp_path / "w1")
    assert "pretraining" not in card["data"] and "recipe.init.run" in card["data"]
    assert card["training"] == {"device": "cpu", "fit_seconds": 50.0,
                                "stages": [{"run": "stage1", "kind": "segment", "fit_seconds": 1000.0}]}

    run("pre", {"kind": "pretrain"}, 7.0)
    run("tuned", {"kind": "segment", "init": {"run": "pre"}}, 8.0)
    card = ship(run("v2", {"kind": "segment", "init": {"run": "tuned"}}, 9.0), "infnet", "infection", "cmd",
                tmp_path / "w2")
    assert "self-supervised pretraining" in card["data"]
    assert [s["run"] for s in card["training"]["stages"]] == ["tuned", "pre"]

    card = ship(run("scratch", {"kind": "segment"}, 3.0), "infnet", "infection", "cmd", tmp_path / "w3")
    assert "recipe.init" not in card["data"] and "stages" not in card["training"]


def test_init_file_names_another_model_of_the_run(tmp_path):
    from covfast.nn import InfNet, save_model
    from training.recipes import _model

    config = {"in_ch": 1, "widths": [8, 16, 32, 64], "ch": 8, "ra_ch": 8}
    (tmp_path / "base").mkdir()
    source = InfNet(widths=(8, 16, 32, 64), ch=8, ra_ch=8)
    save_model(source, tmp_path / "base" / "fold0.safetensors", "infnet", config)
    recipe = {"model": {"arch": "infnet", "config": config},
              "init": {"run": "base", "file": "fold0.safetensors", "prefix": ""}}
    model, note = _model(recipe, tmp_path)
    assert "fold0.safetensors" in note
    for (name, got), expected in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(got, expected), name


def test_init_file_model_placeholder_follows_the_fit(tmp_path):
    from covfast.nn import InfNet, save_model
    from training.recipes import _model

    config = {"in_ch": 1, "widths": [8, 16, 32, 64], "ch": 8, "ra_ch": 8}
    (tmp_path / "base").mkdir()
    sources = {}
    for i, name in enumerate(("fold2.safetensors", "final.safetensors")):
        torch.manual_seed(i)
        sources[name] = InfNet(widths=(8, 16, 32, 64), ch=8, ra_ch=8)
        save_model(sources[name], tmp_path / "base" / name, "infnet", config)
    recipe = {"model": {"arch": "infnet", "config": config},
              "init": {"run": "base", "file": "{model}", "prefix": ""}}
    for name, source in sources.items():
        model, note = _model(recipe, tmp_path, name)
        assert name in note
        for (key, got), expected in zip(model.state_dict().items(), source.state_dict().values()):
            assert torch.equal(got, expected), key
    first = next(iter(sources["fold2.safetensors"].state_dict().values()))
    assert not torch.equal(first, next(iter(sources["final.safetensors"].state_dict().values())))


def test_teacher_targets_are_the_flip_mean_of_the_runs_and_cached_by_their_sha(tmp_path, monkeypatch):
    from training import recipes

    config = {"in_ch": 1, "widths": [8, 8, 16, 16], "ch": 8, "ra_ch": 8}
    models = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        models[name] = build_model("infnet", **config).eval()
        (tmp_path / name).mkdir()
        save_model(models[name], tmp_path / name / "fold1.safetensors", "infnet", config)
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    spec = {"runs": ["a", "b"], "tta": {"a": "h"}}
    cache = tmp_path / "st" / "teacher_fold1.npz"
    got = recipes.teacher_targets(spec, tmp_path, "fold1.safetensors", images, cache)
    prob_a = (predict(models["a"], images, "infection") + predict(models["a"], images.flip(-1), "infection").flip(-1)) / 2
    expected = ((prob_a + predict(models["b"], images, "infection")) / 2 * 255).round().to(torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == (3, 1, 32, 32)
    assert (got.int() - expected.int()).abs().max() <= 1
    # A second call reads the cache; changing a teacher's weights recomputes.
    monkeypatch.setattr(recipes, "flip_probs", lambda *a, **k: pytest.fail("recomputed a cached teacher"))
    assert torch.equal(recipes.teacher_targets(spec, tmp_path, "fold1.safetensors", images, cache), got)
    torch.manual_seed(7)
    save_model(build_model("infnet", **config), tmp_path / "b" / "fold1.safetensors", "infnet", config)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        recipes.teacher_targets(spec, tmp_path, "fold1.safetensors", images, cache)


def test_with_teacher_blends_the_published_pseudo_labels(tmp_path, monkeypatch):
    from training import recipes

    teacher = torch.full((2, 1, 8, 8), 200, dtype=torch.uint8)
    monkeypatch.setattr(recipes, "teacher_targets", lambda *a, **k: teacher)
    pseudo = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    pseudo[0] = 255
    unlabelled = SliceSet(["u0", "u1"], torch.zeros(2, 1, 8, 8, dtype=torch.uint8), pseudo)
    recipe = {"name": "st", "teacher": {"runs": ["a"], "pseudo_weight": 0.5}}
    groups = recipes._with_teacher(recipe, tmp_path, {"ctmd": "kept"}, unlabelled, "fold0.safetensors")
    assert groups["ctmd"] == "kept"
    assert groups["teacher"].targets[0].unique().tolist() == [228]  # round((200 + 255) / 2)
    assert groups["teacher"].targets[1].unique().tolist() == [100]
    assert recipes._with_teacher({"name": "x"}, tmp_path, None, unlabelled, "final.safetensors") is None


# ---------------------------------------------------------------- COVID-CT-MD labels

CTMD_LABELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-ct-md" / "labels.json"


def test_ctmd_labels_run_superior_first_and_match_by_location():
    from training.ctmd import labels_at, lobe_centres, slice_labels

    # labels.json: locations ascending, label arrays superior first (the dataset's own order).
    info = {
        "slice_location_mm": [-10.0, -8.0, -6.0, -4.0],
        "infection_slice_labels": [1, 1, 0, 0],
        "infection_lobe_labels": [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]],
    }
    np.testing.assert_array_equal(slice_labels(info), [False, False, True, True])
    np.testing.assert_array_equal(labels_at(info, np.array([-4.2, -10.0, -6.5])), [True, False, True])
    assert lobe_centres(info) == {"RLL": -10.0, "RUL": -5.0}
    with pytest.raises(ValueError, match="do not match"):
        labels_at(info, np.array([-12.0]))


@pytest.mark.skipif(not CTMD_LABELS.is_file(), reason="../shared/data/covid-ct-md is not present")
def test_ctmd_lobe_labels_read_in_anatomical_order():
    """P001's right lower, middle and upper lobe labels must run inferior to superior (location ascending).

    This fails if labels.json's arrays are ever stored in ascending order: then flip training.ctmd.LABELS_DESCENDING.
    """
    from training.ctmd import lobe_centres

    centres = lobe_centres(json.loads(CTMD_LABELS.read_text())["P001"])
    assert centres["RLL"] < centres["RML"] < centres["RUL"]


@pytest.mark.skipif(not CTMD_LABELS.is_file(), reason="../shared/data/covid-ct-md is not present")
def test_ctmd_crops_cache_the_crops_but_read_labels_fresh(tmp_path):
    from training.ctmd import slice_labels
    from training.negatives import ctmd_crops

    data = CTMD_LABELS.parent
    first = ctmd_crops(data, "P001", 32, tmp_path)
    expected = slice_labels(json.loads(CTMD_LABELS.read_text())["P001"])[first["z"]]
    np.testing.assert_array_equal(first["labels"], expected)
    (cached,) = tmp_path.glob("ctmd_P001_32_*.npz")
    with np.load(cached) as saved:
        assert sorted(saved.files) == ["images", "z"]
    again = ctmd_crops(data, "P001", 32, tmp_path)
    for key in ("images", "z", "labels"):
        np.testing.assert_array_equal(again[key], first[key])
    assert first["images"].shape[1:] == (1, 32, 32) and 0 < first["labels"].sum() < len(first["z"])


@pytest.mark.skipif(not (CTMD_LABELS.parents[1] / "ccccii-cp").is_dir(), reason="../shared/data/ccccii-cp is not present")
def test_ccccii_scans_map_back_to_hounsfield_units(tmp_path):
    """training.affinity.ccccii_hu (the affinity cache and ccccii_volumes.py): the 8-bit window inverted to HU."""
    from training.affinity import CCCCII_WINDOW_HU, ccccii_hu
    from training.analysis.ccccii_volumes import main

    data = CTMD_LABELS.parents[1]
    hu = ccccii_hu(data, "3132")
    assert hu.shape == (42, 512, 512) and hu.dtype == np.int16
    assert CCCCII_WINDOW_HU[0] <= hu.min() < -900 and -100 < hu.max() <= CCCCII_WINDOW_HU[1]  # air and soft tissue
    with pytest.raises(FileNotFoundError, match="9999"):
        ccccii_hu(data, "9999")
    assert main(["--data", str(data), "--out", str(tmp_path)]) == 0
    import nibabel as nib

    written = np.asarray(nib.load(str(tmp_path / "cp_3132.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.transpose(written, (2, 1, 0)), hu)


def test_train_step_speed_benchmark_runs_every_mode_and_restores_the_loss():
    import importlib.util

    from training import losses

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step_speed.py"
    spec = importlib.util.spec_from_file_location("train_step_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from training import loops

    box_mean, infnet_loss = losses.box_mean, loops.infnet_loss
    for mode in bench.MODES:
        assert bench.step_ms("unet", {"in_ch": 1, "out_ch": 1, "base": 4}, mode, steps=1, batch=2, size=32) > 0
        assert bench.step_ms("infnet", TINY_INFNET, mode, steps=1, batch=2, size=32) > 0
    assert losses.box_mean is box_mean and loops.infnet_loss is infnet_loss

    # The pre-session-14 loss is the same number, only slower: one weight per map equals one weight per target.
    torch.manual_seed(0)
    model = build_model("infnet", **TINY_INFNET)
    x, y = torch.rand(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    out = model(x)
    torch.testing.assert_close(bench.infnet_loss_before_s14(out, y, torch.ones_like(y)),
                               losses.infnet_loss(out, y, torch.ones_like(y)))
