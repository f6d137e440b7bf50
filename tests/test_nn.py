"""Models: tiny forward/backward, parameter budget, safetensors round trip, golden output of the shipped model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from covfast.nn import InfNet, InfNetOutput, ResUNet, UNet, build_model, count_parameters, load_model, save_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "infnet-semiseg"
LABELLED = DATA / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
MULTICLASS = DATA / "TrainingSet" / "MultiClassInfection-Train"
WEIGHTS = Path(__file__).resolve().parents[1] / "covfast" / "weights" / "infnet.safetensors"
MULTICLASS_WEIGHTS = WEIGHTS.with_name("infnet_multiclass.safetensors")

# Shipped infnet on labelled slice 2.jpg (measured once with the committed weights, CPU, reference ops).
GOLDEN = {"mean_prob": 0.010235, "dice": 0.9067, "mae": 0.002184}
# The shipped ensemble (infnet + infection_unet, probabilities averaged, no flips) on the same slice.
GOLDEN_ENSEMBLE = {"mean_prob": 0.016291, "dice": 0.9180, "mae": 0.008879}
# Shipped infnet + infnet_multiclass on labelled slice 3.jpg (GGO and consolidation both present), measured likewise.
GOLDEN_MULTICLASS = {
    "mean_class_prob": (0.753450, 0.152642, 0.093908),
    "ggo": {"dice": 0.7942, "mae": 0.08693},
    "consolidation": {"dice": 0.7909, "mae": 0.06103},
}

TINY = {
    "infnet": ({"in_ch": 1, "widths": (8, 8, 16, 16), "ch": 8, "ra_ch": 8}, 1),
    "unet": ({"in_ch": 1, "out_ch": 3, "base": 4}, 1),
    "resunet": ({"in_ch": 2, "out_ch": 3, "widths": (8, 8, 16, 16), "blocks": 1}, 2),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_forward_backward(arch):
    torch.manual_seed(0)
    config, in_ch = TINY[arch]
    model = build_model(arch, **config)
    x = torch.randn(2, in_ch, 64, 64)
    out = model(x)
    maps = [out.global_map, *out.side, out.edge] if isinstance(out, InfNetOutput) else [out]
    for m in maps:
        assert m.shape[0] == 2 and m.shape[-2:] == (64, 64)
        assert torch.isfinite(m).all()
    sum(m.square().mean() for m in maps).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv = next(p for p in model.parameters() if p.dim() == 4)
    assert first_conv.grad.abs().sum() > 0


def test_infnet_side_outputs_refine_coarse_to_fine():
    out = InfNet(widths=(8, 8, 16, 16), ch=8, ra_ch=8).eval()(torch.randn(1, 1, 64, 64))
    assert len(out.side) == 3
    assert out.prediction is out.side[-1]


def test_infnet_fine_stage_predicts_at_stride_4():
    """``fine``: a fourth side output S_2 whose logits vary within 4 x 4 blocks (S_3 is bilinear from /8), trained
    like the others; a network without it has no ``ra_fine`` weights, so older files load unchanged."""
    torch.manual_seed(0)
    coarse, fine = InfNet(widths=(8, 8, 16, 16), ch=8, ra_ch=8), InfNet(widths=(8, 8, 16, 16), ch=8, ra_ch=8, fine=True)
    assert not any(name.startswith("ra_fine") for name in coarse.state_dict())
    missing, unexpected = fine.load_state_dict(coarse.state_dict(), strict=False)
    assert all(name.startswith("ra_fine") for name in missing) and missing and not unexpected
    out = fine.eval()(torch.randn(1, 1, 64, 64))
    assert len(out.side) == 4 and out.prediction is out.side[-1] and out.prediction.shape[-2:] == (64, 64)
    assert not torch.allclose(out.side[-1], out.side[-2])
    out = fine.train()(torch.randn(2, 1, 64, 64))
    out.prediction.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fine.ra_fine.parameters())


def test_parameter_budget():
    assert count_parameters(InfNet()) <= 8_000_000
    assert count_parameters(ResUNet(in_ch=2, out_ch=3)) <= 8_000_000
    assert count_parameters(UNet(base=16)) <= 8_000_000


@pytest.mark.parametrize("arch", sorted(TINY))
def test_save_load_round_trip(arch, tmp_path):
    torch.manual_seed(1)
    config, in_ch = TINY[arch]
    model = build_model(arch, **config)
    # A few training-mode passes move the batch-norm statistics away from their initial values.
    model.train()
    for _ in range(2):
        model(torch.randn(2, in_ch, 64, 64))
    model.eval()
    path = tmp_path / f"{arch}.safetensors"
    save_model(model, path, arch, {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    loaded = load_model(path)
    x = torch.randn(1, in_ch, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    a = a.prediction if isinstance(a, InfNetOutput) else a
    b = b.prediction if isinstance(b, InfNetOutput) else b
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_refuses_file_without_architecture(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a covfast model file"):
        load_model(path)


@pytest.mark.skipif(not (LABELLED.exists() and WEIGHTS.exists()), reason="needs ../shared/data and shipped weights")
def test_golden_output_on_real_slice():
    from PIL import Image

    from covfast.evaluate import binary_metrics
    from covfast.pipeline.infection import load_models, predict_slices

    image = np.asarray(Image.open(LABELLED / "Imgs" / "2.jpg").convert("L"))
    truth = np.asarray(Image.open(LABELLED / "GT" / "2.png").convert("L")) > 127
    torch.manual_seed(0)
    prob, _ = predict_slices(load_models("cpu", multiclass=False, ensemble=False), image[None], tta="none")
    metrics = binary_metrics(prob[0], truth)
    # Expected values measured with the committed weights (infnet sha256 in covfast/weights/infnet.json), the
    # Inf-Net alone.
    assert prob.shape == (1, *image.shape)
    assert float(prob.mean()) == pytest.approx(GOLDEN["mean_prob"], abs=2e-4)
    assert metrics["dice"] == pytest.approx(GOLDEN["dice"], abs=2e-3)
    assert metrics["mae"] == pytest.approx(GOLDEN["mae"], abs=2e-4)
    if (WEIGHTS.parent / "infection_unet.safetensors").exists():
        prob, _ = predict_slices(load_models("cpu", multiclass=False), image[None], tta="none")
        metrics = binary_metrics(prob[0], truth)
        assert float(prob.mean()) == pytest.approx(GOLDEN_ENSEMBLE["mean_prob"], abs=2e-4)
        assert metrics["dice"] == pytest.approx(GOLDEN_ENSEMBLE["dice"], abs=2e-3)
        assert metrics["mae"] == pytest.approx(GOLDEN_ENSEMBLE["mae"], abs=2e-4)


@pytest.mark.skipif(
    not (MULTICLASS.exists() and MULTICLASS_WEIGHTS.exists()), reason="needs ../shared/data and shipped weights"
)
def test_golden_multiclass_output_on_real_slice():
    from PIL import Image

    from covfast.evaluate import multiclass_metrics
    from covfast.pipeline.infection import load_models, predict_slices

    image = np.asarray(Image.open(MULTICLASS / "Imgs" / "3.jpg").convert("L"))
    truth = np.asarray(Image.open(MULTICLASS / "GT" / "3.png"))
    _, class_prob = predict_slices(load_models("cpu", ensemble=False), image[None], tta="none")
    # Expected values measured with the committed weights (sha256 in covfast/weights/infnet*.json), the prior from
    # the Inf-Net alone.
    assert class_prob.shape == (1, 3, *image.shape)
    np.testing.assert_allclose(class_prob[0].mean(axis=(1, 2)), GOLDEN_MULTICLASS["mean_class_prob"], atol=5e-4)
    metrics = multiclass_metrics(class_prob[0], truth)
    for name in ("ggo", "consolidation"):
        assert metrics[name]["present"]
        assert metrics[name]["dice"] == pytest.approx(GOLDEN_MULTICLASS[name]["dice"], abs=2e-3)
        assert metrics[name]["mae"] == pytest.approx(GOLDEN_MULTICLASS[name]["mae"], abs=5e-4)
