"""Infection stage contract on a small synthetic volume: shapes, dtypes, zeros off the lungs, progress, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covfast.errors import ModelNotInstalledError
from covfast.pipeline.infection import (
    CROP_MARGIN,
    WEIGHTS_DIR,
    crop_min_size,
    gate_aerated,
    installed_models,
    lung_crop,
    lung_slices,
    segment_infection,
    slice_view,
    window_hu,
)
from covfast.pipeline.severity import DEFAULT_RULES

HAS_WEIGHTS = (WEIGHTS_DIR / "infnet.safetensors").exists()
ENGINES = ("torch", "onnx")


@pytest.fixture(autouse=True)
def engine_dir(request, monkeypatch):
    """ONNX exports (``engine="auto"`` picks onnxruntime on a CPU when installed) go to pytest's cache folder, not
    ~/.cache; an export there is reused only if it was made from the same weights."""
    monkeypatch.setenv("COVFAST_ENGINE_DIR", str(request.config.cache.mkdir("covfast_engines")))


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


def test_lung_crop_grows_small_lungs_to_the_least_size_inside_the_slice():
    lung = np.zeros((100, 100), bool)
    lung[40:50, 2:12] = True  # a small lung near the left edge
    rows, cols = lung_crop(lung, (30, 30))
    margin = round(CROP_MARGIN * 30)
    # Grown about the centre to 30 rows; the columns shifted right to stay inside the slice, then the margin.
    assert (rows.start, rows.stop) == (30 - margin, 60 + margin)
    assert (cols.start, cols.stop) == (0, 30 + margin)
    # Never larger than the slice; a box already larger than the least size is unchanged.
    rows, cols = lung_crop(lung, (500, 500))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 100, 0, 100)
    assert lung_crop(lung, (5, 5)) == lung_crop(lung)


def test_crop_min_size_is_the_largest_lung_extent_of_the_volume():
    lung = np.zeros((3, 50, 60), np.uint8)
    lung[0, 10:20, 5:15] = 1  # apex: 10 x 10
    lung[1, 5:45, 3:50] = 2  # widest slice: 40 rows, 47 columns
    lung[1, 30:31, 55:58] = 1  # a separate piece widens the columns to 3..57
    assert crop_min_size(lung) == (40, 55)
    assert crop_min_size(lung, 0.5) == (20, 28)
    assert crop_min_size(np.zeros((2, 5, 5), np.uint8)) == (0, 0)
    # lung_slices crops every slice to at least that size: the apex is not magnified beyond the widest slice.
    (_, (rows, cols)), _ = lung_slices(lung)
    assert rows.stop - rows.start >= 40 and cols.stop - cols.start >= 55


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


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / denom if denom else 1.0


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_torch_and_onnx_engines_give_the_same_masks(sample_slab):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install covfast[onnx])")
    hu, lung = sample_slab
    results = {kind: segment_infection(hu, lung, (2.0, 0.7, 0.7), batch_size=3, engine=kind) for kind in ENGINES}
    torch_run, onnx_run = results["torch"], results["onnx"]
    assert {name: e["engine"] for name, e in torch_run.engines.items()} == dict.fromkeys(torch_run.engines, "torch-cpu")
    assert {name: e["engine"] for name, e in onnx_run.engines.items()} == dict.fromkeys(
        torch_run.engines, "onnxruntime-cpu")
    assert list(onnx_run.engines) == [m["name"] for m in onnx_run.models]
    assert np.abs(torch_run.prob - onnx_run.prob).max() < 1e-4
    infected = torch_run.prob > 0.5
    assert infected.sum() > 100  # the sample is a COVID-19 case: the comparison covers real lesions
    assert _dice(infected, onnx_run.prob > 0.5) > 0.999
    if torch_run.classes is not None:
        for label in (1, 2):
            assert _dice(torch_run.classes == label, onnx_run.classes == label) > 0.999


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_torch_engine_matches_the_networks_run_directly(sample_slab):
    """The engine path reproduces the networks' own forward pass (predict_slices) on the same slice views."""
    from covfast.pipeline.infection import load_models, predict_slices

    hu, lung = sample_slab
    result = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="torch")
    z, crop = lung_slices(lung)[2]
    view = slice_view(hu, z, crop)
    prob, _ = predict_slices(load_models("cpu"), view[None])
    in_lung = lung[z, crop[0], crop[1]] > 0  # the stage keeps only in-lung findings
    np.testing.assert_allclose(result.prob[z, crop[0], crop[1]], np.where(in_lung, prob[0].T, 0), atol=1e-5)


def test_unknown_engine_is_a_usage_error():
    from covfast.errors import UsageError

    if not HAS_WEIGHTS:
        pytest.skip("needs the shipped infnet weights")
    with pytest.raises(UsageError, match="unknown engine"):
        segment_infection(*_volume(), (2.0, 0.7, 0.7), engine="openvino")


def test_window_hu_tensor_equals_window_hu():
    from covfast.pipeline.infection import window_hu_tensor

    every_int16 = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(window_hu_tensor(torch.from_numpy(every_int16)).numpy(), window_hu(every_int16))
    fractional = np.random.default_rng(0).uniform(-1100, 300, 100_000).astype(np.float32)
    assert np.array_equal(window_hu_tensor(torch.from_numpy(fractional)).numpy(), window_hu(fractional))


def test_prepare_batch_equals_per_slice_views(sample_slab):
    """The batched preparation gives exactly the inputs of the per-slice path (window, crop, transpose, resize)."""
    from covfast.nn.preprocess import INPUT_SIZE, to_input
    from covfast.pipeline.infection import prepare_batch

    hu, lung = sample_slab
    work = lung_slices(lung)
    batch = prepare_batch(torch.from_numpy(hu), work)
    assert batch.shape == (len(work), 1, INPUT_SIZE, INPUT_SIZE) and batch.dtype == torch.float32
    expected = torch.cat([to_input(torch.from_numpy(slice_view(hu, z, crop))[None, None]) for z, crop in work])
    assert torch.equal(batch, expected)


@pytest.mark.cuda
def test_prepare_batch_on_cuda_matches_cpu(sample_slab):
    """The same preparation with the volume on the GPU (windowing exact; resampling within float32 rounding)."""
    from covfast.pipeline.infection import prepare_batch

    hu, lung = sample_slab
    work = lung_slices(lung)
    on_gpu = prepare_batch(torch.from_numpy(hu).cuda(), work)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), prepare_batch(torch.from_numpy(hu), work), rtol=0, atol=1e-5)


class _Recorder:
    """A network stand-in returning fixed maps and recording the batches it ran (to test the plumbing around it)."""

    def __init__(self, outputs: np.ndarray):
        self.outputs, self.batches = torch.from_numpy(outputs), []

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch)
        return self.outputs[: len(batch)]

    def run_with_features(self, batch: torch.Tensor):
        return self.run_tensor(batch), None


def test_multiclass_network_runs_only_on_slices_with_a_finding():
    from covfast.pipeline.infection import MULTICLASS_MIN_PROB, _run_networks

    size = 8
    prob = np.zeros((3, 1, size, size), np.float32)
    prob[0, 0, 2, 3] = MULTICLASS_MIN_PROB  # at the threshold: runs
    prob[1, 0] = MULTICLASS_MIN_PROB - 1e-3  # everywhere just below: skipped
    prob[2, 0, 5, 5] = 0.97
    single = _Recorder(prob)
    labelled = np.random.default_rng(1).dirichlet(np.ones(3), size=(2, size, size)).transpose(0, 3, 1, 2)
    multi = _Recorder(labelled.astype(np.float32))
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 1, size, size)).astype(np.float32))
    out_prob, class_prob, features, own = _run_networks(
        {"infnet": single.run_with_features, "infnet_multiclass": multi.run_tensor}, x)
    assert features is None
    np.testing.assert_array_equal(out_prob.numpy(), prob)
    assert own is out_prob  # no partner: the Inf-Net's probability is the stage's
    (batch,) = multi.batches
    assert batch.shape == (2, 2, size, size)
    torch.testing.assert_close(batch[:, 0], x[[0, 2], 0], rtol=0, atol=0)  # the slices, with their prior channel
    np.testing.assert_array_equal(class_prob[[0, 2]].numpy(), labelled.astype(np.float32))
    assert (class_prob[1, 0] == 1).all() and (class_prob[1, 1:] == 0).all()


def test_partner_probability_is_averaged_before_the_multiclass_prior():
    """With the U-Net partner the stage's probability is the mean of both networks', and the multi-class network's
    prior and its skip rule read that mean: a slice only the partner marks at 1.0 reaches the 0.5 threshold."""
    from covfast.nn.preprocess import PIXEL_MEAN, PIXEL_STD
    from covfast.pipeline.infection import MULTI_CLASS, PARTNER, SINGLE_CLASS, _run_networks

    size = 8
    single_prob = np.zeros((2, 1, size, size), np.float32)
    single_prob[0, 0, 1, 1] = 0.4
    partner_prob = np.zeros_like(single_prob)
    partner_prob[1, 0, 6, 6] = 1.0
    partner_prob[0, 0, 1, 1] = 0.2
    single, partner = _Recorder(single_prob), _Recorder(partner_prob)
    multi = _Recorder(np.full((1, 3, size, size), 1 / 3, np.float32))
    x = torch.zeros((2, 1, size, size))
    prob, class_prob, _, own = _run_networks(
        {SINGLE_CLASS: single.run_with_features, PARTNER: partner.run_tensor, MULTI_CLASS: multi.run_tensor}, x)
    np.testing.assert_allclose(prob.numpy(), (single_prob + partner_prob) / 2)
    np.testing.assert_array_equal(own.numpy(), single_prob)
    assert prob[0, 0, 1, 1].item() == pytest.approx(0.3)
    (batch,) = multi.batches  # only slice 1 reaches 0.5, through the partner
    assert batch.shape == (1, 2, size, size)
    torch.testing.assert_close(batch[0, 1], (prob[1, 0] - PIXEL_MEAN) / PIXEL_STD)
    assert (class_prob[0, 0] == 1).all()


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_stage_counts_equal_the_reduction_of_its_masks(sample_slab):
    """The per-slice counts the stage takes where the masks are made equal infection_ratio on the returned arrays;
    nothing is marked outside the lung mask."""
    from covfast.ops import infection_ratio
    from covfast.pipeline.severity import PROBABILITY_THRESHOLD

    hu, lung = sample_slab
    seg = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="torch")
    outside = lung == 0
    assert not seg.prob[outside].any() and not seg.mask[outside].any()
    if seg.classes is None:
        np.testing.assert_array_equal(seg.mask, (seg.prob > PROBABILITY_THRESHOLD).astype(np.uint8))
    else:
        assert seg.mask is seg.classes
    lung_voxels, infected_voxels, _ = infection_ratio(torch.from_numpy(lung), torch.from_numpy(seg.mask), 0.5)
    soft_sum = infection_ratio(torch.from_numpy(lung), torch.from_numpy(seg.prob), 0.5)[2]
    np.testing.assert_array_equal(seg.counts.lung_voxels, lung_voxels.numpy())
    np.testing.assert_array_equal(seg.counts.infected_voxels, infected_voxels.numpy())
    np.testing.assert_allclose(seg.counts.soft_sum, soft_sum.numpy(), rtol=1e-12)
    assert seg.counts.infected_voxels.sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_stage_on_cuda_matches_cpu(sample_slab):
    """The device-resident stage (volume, crops, networks, masks and counts on the GPU) against the CPU run."""
    hu, lung = sample_slab
    gpu = segment_infection(hu, lung, (2.0, 0.7, 0.7), device="cuda", engine="torch")
    cpu = segment_infection(hu, lung, (2.0, 0.7, 0.7), device="cpu", engine="torch")
    # cuDNN runs float32 convolutions in TF32 by default: an H100 measured 1.04e-3 here (session 18)
    assert np.abs(gpu.prob - cpu.prob).max() < 5e-3
    assert _dice(gpu.mask > 0, cpu.mask > 0) > 0.99
    np.testing.assert_array_equal(gpu.counts.lung_voxels, cpu.counts.lung_voxels)


@pytest.mark.skipif(not (WEIGHTS_DIR / "affinity.safetensors").exists(), reason="affinity weights not installed")
def test_diagnosis_sees_the_probability_its_head_was_trained_on(sample_slab):
    """The pipeline hands the Inf-Net's view probabilities to the diagnosis stage; its class probabilities then equal
    the training path's (training/affinity.py: the Inf-Net run on the view, RoIs from that probability)."""
    from covfast.nn.preprocess import to_input
    from covfast.pipeline import diagnosis
    from covfast.pipeline.infection import SINGLE_CLASS, load_models

    hu, lung = sample_slab
    seg = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="torch", multiclass=False, tta="none")
    assert sorted(seg.view_prob) == [z for z, _ in lung_slices(lung)]
    result = diagnosis.diagnose(hu, lung, seg.prob * (lung > 0), (2.0, 0.7, 0.7), view_prob=seg.view_prob)
    infnet = load_models("cpu", multiclass=False)[SINGLE_CLASS]
    head, _ = diagnosis.load_affinity("cpu")
    extractor = diagnosis.RoiFeatures(infnet.model.backbone, head.beta)
    x = torch.cat([to_input(torch.from_numpy(slice_view(hu, z, crop))[None, None]) for z, crop in lung_slices(lung)])
    with torch.no_grad():
        rois, counts = extractor(x, torch.sigmoid(infnet.model(x).prediction.float()))
        expected = diagnosis.class_probs(head(rois))
    got = np.array([[entry["head_probs"][c] for c in ("covid", "pneumonia", "normal")] for entry in result["slices"]])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [entry["lesions"] for entry in result["slices"]] == counts
    # The reported class probabilities are the cascade's: the head's split, the segmentation's p(abnormal).
    areas = ((seg.prob * (lung > 0)) > 0.5).sum(axis=(1, 2))[[e["index"] for e in result["slices"]]] * 0.7 * 0.7
    cascade = np.array([[entry["class_probs"][c] for c in ("covid", "pneumonia", "normal")] for entry in result["slices"]])
    np.testing.assert_allclose(cascade, diagnosis.cascade_probs(got, areas, DEFAULT_RULES.min_lesion_area_mm2), atol=1e-9)
    # The backbone features the infection stage hands over replace the diagnosis' own backbone pass.
    assert sorted(seg.view_features) == sorted(seg.view_prob)
    reused = diagnosis.diagnose(hu, lung, seg.prob, (2.0, 0.7, 0.7), view_prob=seg.view_prob,
                                view_features=seg.view_features)
    again = np.array([[entry["head_probs"][c] for c in ("covid", "pneumonia", "normal")] for entry in reused["slices"]])
    np.testing.assert_allclose(again, expected, atol=1e-4)
    assert [entry["lesions"] for entry in reused["slices"]] == counts


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_bf16_autocast_runs_torch_and_stays_close(sample_slab):
    """--precision bf16: auto passes over onnxruntime (fp32 or int8 only) to torch under autocast; masks stay close to fp32
    (the volume-level Dice change is measured in benchmarks/results)."""
    hu, lung = sample_slab
    fp32 = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="torch")
    bf16 = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="auto", precision="bf16")
    described = bf16.engines["infnet"]
    assert described["engine"] == "torch-cpu-bf16"
    assert ("onnx", "runs fp32 or int8 and bf16 was asked for") in [(s["engine"], s["reason"]) for s in described["skipped"]]
    assert bf16.prob.dtype == np.float32
    assert np.abs(bf16.prob - fp32.prob).max() < 0.2
    assert _dice(bf16.mask > 0, fp32.mask > 0) > 0.9


def test_unknown_precision_is_a_usage_error():
    from covfast.errors import UsageError

    if not HAS_WEIGHTS:
        pytest.skip("needs the shipped infnet weights")
    with pytest.raises(UsageError, match="unknown precision"):
        segment_infection(*_volume(), (2.0, 0.7, 0.7), precision="int4")


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
def test_first_max_channel_equals_argmax_with_ties(channels):
    from covfast.pipeline.infection import _first_max_channel

    gen = torch.Generator().manual_seed(channels)
    maps = (torch.rand(channels, 17, 23, generator=gen) * 4).round() / 4  # few distinct values: many ties
    torch.testing.assert_close(_first_max_channel(maps), maps.argmax(dim=0).to(torch.uint8), rtol=0, atol=0)


class _AsymmetricEngine:
    """A stand-in engine whose output depends on where a pixel sits, so flipped passes differ from the plain one."""

    def __init__(self, channels: int):
        self.channels = channels

    def run_tensor(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1], device=x.device) * torch.linspace(1, 2, x.shape[-2], device=x.device)[:, None]
        out = torch.sigmoid(x[:, :1] * ramp + x[:, -1:])
        return out.expand(-1, self.channels, -1, -1).clone()

    def run_with_features(self, x):
        return self.run_tensor(x), x[:, :1, ::8, ::8] * 3


@pytest.mark.parametrize("one_batch", [None, False, True])
@pytest.mark.parametrize("tta", ["h", "hv"])
def test_tta_runners_average_the_flipped_passes(tta, one_batch):
    from covfast.pipeline.infection import _runners

    single, multi = _AsymmetricEngine(1), _AsymmetricEngine(3)
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    flips = [(-1,)] + ([(-2,)] if tta == "hv" else [])
    runners = _runners({"infnet": single, "infnet_multiclass": multi}, tta, one_batch=one_batch)
    run_single, run_multi = runners["infnet"], runners["infnet_multiclass"]
    prob, features = run_single(x[:, :1])
    expected = single.run_tensor(x[:, :1]) + sum(single.run_tensor(x[:, :1].flip(d)).flip(d) for d in flips)
    torch.testing.assert_close(prob, expected / (len(flips) + 1))
    assert not torch.allclose(prob, single.run_tensor(x[:, :1]))
    torch.testing.assert_close(features, x[:, :1, ::8, ::8] * 3)  # the unflipped pass's features
    expected = multi.run_tensor(x) + sum(multi.run_tensor(x.flip(d)).flip(d) for d in flips)
    torch.testing.assert_close(run_multi(x), expected / (len(flips) + 1))
    plain = _runners({"infnet": single, "infnet_multiclass": multi}, "none", one_batch=one_batch)
    torch.testing.assert_close(plain["infnet"](x[:, :1])[0], single.run_tensor(x[:, :1]))
    torch.testing.assert_close(plain["infnet_multiclass"](x), multi.run_tensor(x))


def test_partner_runs_with_its_own_tta(monkeypatch):
    """The U-Net partner takes PARTNER_TTA's flips whatever ``tta`` says (None: it follows ``tta``)."""
    from covfast.pipeline import infection
    from covfast.pipeline.infection import PARTNER, SINGLE_CLASS, _runners

    single, partner = _AsymmetricEngine(1), _AsymmetricEngine(1)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    flipped = (partner.run_tensor(x) + partner.run_tensor(x.flip(-1)).flip(-1)) / 2
    monkeypatch.setattr(infection, "PARTNER_TTA", "none")
    runners = _runners({SINGLE_CLASS: single, PARTNER: partner}, "h")
    torch.testing.assert_close(runners[PARTNER](x), partner.run_tensor(x))
    assert not torch.allclose(runners[SINGLE_CLASS](x)[0], single.run_tensor(x))  # the Inf-Net still flips
    monkeypatch.setattr(infection, "PARTNER_TTA", None)
    torch.testing.assert_close(_runners({SINGLE_CLASS: single, PARTNER: partner}, "h")[PARTNER](x), flipped)


class _CountingEngine(_AsymmetricEngine):
    """Records the batch size of every call."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.calls = []

    def run_tensor(self, x):
        self.calls.append(x.shape[0])
        return super().run_tensor(x)


@pytest.mark.parametrize(("one_batch", "calls"), [(True, [6]), (False, [2, 2, 2]), (None, [2, 2, 2])])
def test_tta_runners_one_batch_for_all_flips_only_when_asked_or_on_a_gpu(one_batch, calls):
    from covfast.pipeline.infection import _runners

    engine = _CountingEngine(3)
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    _runners({"infnet_multiclass": engine}, "hv", one_batch=one_batch)["infnet_multiclass"](x)
    assert engine.calls == calls  # None on CPU inputs: one call per flip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tta_runners_default_to_one_batch_on_a_gpu():
    from covfast.pipeline.infection import _runners

    engine = _CountingEngine(3)
    x = torch.randn(2, 2, 16, 16, device="cuda")
    out = _runners({"infnet_multiclass": engine}, "hv")["infnet_multiclass"](x)
    assert engine.calls == [6]
    torch.testing.assert_close(out, _runners({"infnet_multiclass": engine}, "hv", one_batch=False)["infnet_multiclass"](x))


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_one_batch_flips_match_separate_passes_on_the_shipped_model(sample_slab):
    from covfast.engine.runtime import TorchEngine
    from covfast.nn.preprocess import to_input
    from covfast.pipeline.infection import _runners, load_models

    hu, lung = sample_slab
    views = [slice_view(hu, z, crop) for z, crop in lung_slices(lung)[:2]]
    x = torch.cat([to_input(torch.from_numpy(v)[None, None]) for v in views])
    engines = {name: TorchEngine(loaded.model, "cpu") for name, loaded in load_models("cpu", multiclass=False).items()}
    apart = {name: run(x) for name, run in _runners(engines, "h", one_batch=False).items()}
    together = {name: run(x) for name, run in _runners(engines, "h", one_batch=True).items()}
    for name, a in apart.items():
        b = together[name]
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
def test_tta_on_the_shipped_model_is_the_mean_of_flipped_predictions(sample_slab):
    from covfast.pipeline.infection import load_models, predict_slices

    hu, lung = sample_slab
    z, crop = lung_slices(lung)[2]
    view = slice_view(hu, z, crop)[None]
    models = load_models("cpu", multiclass=False, ensemble=False)  # the Inf-Net's flips (the partner runs once)
    plain = predict_slices(models, view, tta="none")[0]
    flipped = predict_slices(models, np.ascontiguousarray(view[:, :, ::-1]), tta="none")[0][:, :, ::-1]
    both = predict_slices(models, view, tta="h")[0]
    np.testing.assert_allclose(both, (plain + flipped) / 2, atol=1e-5)
    assert np.abs(both - plain).max() > 1e-3
    result = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="torch", multiclass=False, tta="hv")
    assert result.prob.shape == hu.shape and not result.prob[lung == 0].any()


def test_unknown_tta_is_a_usage_error(capsys):
    from covfast.cli import main
    from covfast.errors import UsageError
    from covfast.pipeline.infection import check_tta

    with pytest.raises(UsageError, match="unknown test-time augmentation"):
        check_tta("rot90")
    assert check_tta(None) == "h" and check_tta("none") == "none"  # None: the pipeline's default
    with pytest.raises(SystemExit) as info:
        main(["infer", "x.nii.gz", "--tta", "rot90"])
    assert info.value.code == 2 and "--tta" in capsys.readouterr().err


def _dome_phantom():
    """A block of lung over slices 0-7 with a dome (a hole of the lung mask) in slices 0-2 of its left half, and
    three findings: a cap on the dome's top (slice 3, over the hole), a lesion resting on lung (slices 4-5 of the
    right half) and a lesion in the lowest slice (nothing below it)."""
    lung = np.zeros((8, 20, 30), np.uint8)
    lung[:, 2:18, 2:28] = 1
    lung[0:3, 6:12, 5:11] = 0  # the dome's island, enclosed by lung in its slices
    mask = np.zeros_like(lung)
    mask[3, 6:12, 5:11] = 1  # the cap
    mask[4:6, 8:12, 18:24] = 1  # on lung
    mask[0, 14:16, 20:24] = 2  # the lowest slice
    prob = np.where(mask > 0, 0.8, 0.02).astype(np.float32)
    return lung, mask, prob


def test_drop_dome_caps_removes_only_what_rests_on_holes():
    from covfast.pipeline.infection import drop_dome_caps

    lung, mask, prob = _dome_phantom()
    m, p = mask.copy(), prob.copy()
    assert drop_dome_caps(m, p, lung, None) == 0 and np.array_equal(m, mask)
    assert drop_dome_caps(m, p, lung, 0.6) == 1
    assert not m[3].any() and (p[3] <= 0.02).all()
    np.testing.assert_array_equal(m[4:], mask[4:])
    np.testing.assert_array_equal(m[:3], mask[:3])
    assert p[4, 9, 20] == pytest.approx(0.8)
    # A cap only half over the hole (the rest over lung) stays at 0.6, goes at 0.4.
    m, p = mask.copy(), prob.copy()
    m[3, 6:12, 11:17] = 1
    p[3, 6:12, 11:17] = 0.8
    assert drop_dome_caps(m.copy(), p.copy(), lung, 0.6) == 0
    assert drop_dome_caps(m, p, lung, 0.4) == 1 and not m[3].any()


def test_drop_components_applies_both_rules_as_in_turn():
    from covfast.pipeline.infection import drop_components, drop_dome_caps, drop_small_components

    lung, mask, prob = _dome_phantom()
    mask[6, 14, 5] = 1  # a lone voxel on lung: small
    prob[6, 14, 5] = 0.8
    spacing = (2.0, 1.0, 1.0)
    m1, p1 = mask.copy(), prob.copy()
    assert drop_small_components(m1, p1, spacing, 0.01) + drop_dome_caps(m1, p1, lung, 0.6) == 2
    m2, p2 = mask.copy(), prob.copy()
    assert drop_components(m2, p2, spacing, min_ml=0.01, lung=lung, dome_support=0.6) == 2
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(p1, p2)
    assert drop_components(mask.copy(), prob.copy(), spacing) == 0  # neither rule asked for


def test_drop_dome_caps_needs_an_enclosed_hole():
    """Non-lung below a finding that reaches the edge of the slice's lung (outside the lung, not a dome's island)
    does not count: the same phantom with the island opened to the lung's border keeps the cap."""
    from covfast.pipeline.infection import drop_dome_caps

    lung, mask, prob = _dome_phantom()
    lung[0:3, 6:12, 0:11] = 0  # the island now runs out of the lung's left border
    assert drop_dome_caps(mask, prob, lung, 0.6) == 0
    one_slice = (lung[:1], mask[:1], prob[:1])
    assert drop_dome_caps(*one_slice, 0.6) == 0


def test_drop_small_components_by_volume_with_26_connectivity():
    from covfast.pipeline.infection import drop_small_components

    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1:4, 1:4, 1:4] = 1  # 27 voxels
    mask[4, 4, 4] = 2  # touches the cube only at a corner: the same 26-connected component
    mask[1, 8, 8] = 1  # a lone voxel
    prob = np.where(mask > 0, 0.8, 0.05).astype(np.float32)
    prob[5, 0, 0] = 0.7  # above threshold in prob only: a component too
    spacing = (2.0, 1.0, 1.0)  # 2 uL per voxel
    m, p = mask.copy(), prob.copy()
    assert drop_small_components(m, p, spacing, 0.0) == 0 and np.array_equal(m, mask)
    assert drop_small_components(m, p, spacing, 0.01) == 2  # the lone voxel and the prob-only voxel (2 uL each)
    assert m[1, 8, 8] == 0 and p[1, 8, 8] == 0 and p[5, 0, 0] == 0
    assert (m[1:4, 1:4, 1:4] == 1).all() and m[4, 4, 4] == 2 and p[4, 4, 4] == pytest.approx(0.8)
    assert p[0, 0, 0] == pytest.approx(0.05)  # below threshold, untouched
    assert drop_small_components(m, p, spacing, 0.057) == 1 and not m.any()  # 28 voxels = 0.056 mL
    assert drop_small_components(m, p, spacing, 1.0) == 0


def _install_partner(weights_dir: Path, seed: int = 3) -> None:
    """A small single-class U-Net installed as the partner (weights + card) beside copies of the shipped Inf-Net."""
    import shutil

    from covfast.nn import build_model, save_model
    from covfast.pipeline.infection import PARTNER, SINGLE_CLASS

    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / f"{SINGLE_CLASS}{suffix}", weights_dir)
    torch.manual_seed(seed)
    config = {"in_ch": 1, "out_ch": 1, "base": 4}
    sha = save_model(build_model("unet", **config).eval(), weights_dir / f"{PARTNER}.safetensors", "unet", config)
    card = {"name": PARTNER, "task": "infection", "params": 1, "sha256": sha}
    (weights_dir / f"{PARTNER}.json").write_text(json.dumps(card))


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infnet weights")
@pytest.mark.parametrize("engine", ENGINES)
def test_installed_partner_is_averaged_into_the_stage_probability(tmp_path, sample_slab, engine):
    """With a partner installed the stage's probability is the mean of the Inf-Net's and the partner's on the same
    inputs (ensemble=False: the Inf-Net's alone), through each engine; the model list names both."""
    if engine == "onnx":
        pytest.importorskip("onnxruntime")
    from covfast.engine.runtime import TorchEngine
    from covfast.pipeline.infection import PARTNER, SINGLE_CLASS, _resize, load_models, prepare_batch

    _install_partner(tmp_path)
    hu, lung = sample_slab
    spacing = (2.0, 0.7, 0.7)
    both = segment_infection(hu, lung, spacing, engine=engine, multiclass=False, weights_dir=tmp_path, tta="none")
    alone = segment_infection(hu, lung, spacing, engine=engine, multiclass=False, weights_dir=tmp_path, tta="none",
                              ensemble=False)
    assert [m["name"] for m in both.models] == [SINGLE_CLASS, PARTNER]
    assert [m["name"] for m in alone.models] == [SINGLE_CLASS]
    work = lung_slices(lung)
    partner = TorchEngine(load_models("cpu", multiclass=False, weights_dir=tmp_path)[PARTNER].model, "cpu")
    partner_view = partner.run_tensor(prepare_batch(torch.from_numpy(hu), work))
    partner_prob = np.zeros(hu.shape, np.float32)  # placed on the volume's grid as the stage places its own
    for i, (z, (rows, cols)) in enumerate(work):
        size = (cols.stop - cols.start, rows.stop - rows.start)
        partner_prob[z, rows, cols] = _resize(partner_view[i : i + 1], size)[0, 0].T.numpy()
    partner_prob[lung == 0] = 0
    np.testing.assert_allclose(both.prob, (alone.prob + partner_prob) / 2, atol=2e-4)
    assert np.abs(both.prob - alone.prob).max() > 1e-3
    for z, _ in work:  # the diagnosis stage reads the Inf-Net's own probability either way
        np.testing.assert_allclose(both.view_prob[z], alone.view_prob[z], atol=1e-5)
