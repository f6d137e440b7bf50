"""Inference engines: ONNX export (standard ops only, dynamic batch, provenance metadata), onnxruntime vs torch
parity, engine selection, and the TensorRT cache key, engine-file refusal and import guard (TensorRT itself is not
installable here; see covfast/engine/tensorrt_builder.py for what runs where).
"""

import dataclasses
import sys

import numpy as np
import onnx
import pytest
import torch

from covfast.engine import (
    EngineFileError,
    EngineKey,
    TensorRTUnavailableError,
    build_engine,
    export_onnx,
    read_metadata,
    select_engine,
    weights_sha256,
)
from covfast.engine import tensorrt_builder as trtb
from covfast.engine.onnx_export import OPSET, ProbabilityHead
from covfast.engine.runtime import OnnxRuntimeEngine
from covfast.errors import UsageError
from covfast.nn import InfNet, ResUNet, save_model
from covfast.nn.preprocess import INPUT_SIZE

SIZE = INPUT_SIZE
TINY_WIDTHS = (8, 16, 32, 64)


def _randomize_batch_norm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every batch norm non-trivial running statistics so the exported graph's folded BN is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


@torch.no_grad()
def _standardize_logits(model: ResUNet, sample: torch.Tensor) -> None:
    """Rescale the last 1x1 convolution so that each class's logit has mean 0 and std 1 on ``sample``.

    A randomly initialised network's class logits differ by a constant far larger than their spatial variation, so
    one class would win everywhere and the per-class Dice below would compare trivial masks.
    """
    conv = model.head[-1]
    logits = model(sample)
    mean, std = logits.mean(dim=(0, 2, 3)), logits.std(dim=(0, 2, 3))
    conv.weight.div_(std.view(-1, 1, 1, 1))
    conv.bias.copy_((conv.bias - mean) / std)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / denom if denom else 1.0


@pytest.fixture(scope="module")
def infnet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize_batch_norm(InfNet(widths=TINY_WIDTHS, ch=8, ra_ch=8), seed=1)
    path = tmp_path_factory.mktemp("infnet") / "infnet.onnx"
    sha = weights_sha256(model)
    exported = export_onnx(model, path, model_sha256=sha, model_name="tiny-infnet", arch="infnet")
    return model, exported, sha


@pytest.fixture(scope="module")
def multiclass_build(tmp_path_factory, monkeypatch_module):
    """A tiny multi-class ResUNet weights file run through build_engine with TensorRT made unimportable."""
    torch.manual_seed(2)
    model = _randomize_batch_norm(ResUNet(in_ch=2, out_ch=3, widths=TINY_WIDTHS, blocks=1), seed=3)
    _standardize_logits(model, torch.randn(2, 2, SIZE, SIZE))
    root = tmp_path_factory.mktemp("multiclass")
    config = {"in_ch": 2, "out_ch": 3, "widths": list(TINY_WIDTHS), "blocks": 1}
    weights = root / "tiny-multiclass.safetensors"
    save_model(model, weights, "resunet", config)
    monkeypatch_module.setitem(sys.modules, "tensorrt", None)
    result = build_engine("fp16", 8, root / "engines", model_files=[weights])
    return model, weights, result


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_onnx_has_only_standard_ops_dynamic_batch_and_provenance(infnet_onnx):
    model, exported, sha = infnet_onnx
    proto = onnx.load(exported["path"])
    onnx.checker.check_model(proto, full_check=True)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert "Resize" in {node.op_type for node in proto.graph.node}  # reverse attention's upsample was decomposed
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    metadata = read_metadata(exported["path"])
    assert metadata["model_sha256"] == sha == weights_sha256(model)
    assert metadata["input_shape"] == f"N,1,{SIZE},{SIZE}"
    assert metadata["activation"] == "sigmoid"
    assert metadata["model_name"] == "tiny-infnet"


def _parity(engine, model, batch: np.ndarray):
    with torch.no_grad():
        expected = ProbabilityHead(model).eval()(torch.from_numpy(batch)).numpy()
    got = engine.run(batch)
    assert got.shape == expected.shape and got.dtype == np.float32
    return got, expected


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_torch_single_class(infnet_onnx, batch_size):
    model, exported, _ = infnet_onnx
    engine = OnnxRuntimeEngine(exported["path"])
    batch = np.random.default_rng(batch_size).standard_normal((batch_size, 1, SIZE, SIZE)).astype(np.float32)
    got, expected = _parity(engine, model, batch)
    assert np.abs(got - expected).max() < 1e-4
    # The second output: the backbone features the diagnosis stage pools its RoIs from, as torch computes them.
    assert read_metadata(exported["path"])["outputs"] == "prob,features"
    prob, features = engine.run_with_features(torch.from_numpy(batch))
    with torch.no_grad():
        expected_features = model(torch.from_numpy(batch)).features
    assert features.shape == expected_features.shape == (batch_size, model.backbone.widths[1], SIZE // 8, SIZE // 8)
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(prob.numpy(), got)
    # 0.5 is the pipeline's threshold; the median makes both masks half full, the hardest case for Dice.
    for threshold in (0.5, float(np.median(expected))):
        assert (expected > threshold).any()
        assert _dice(got > threshold, expected > threshold) > 0.999


def test_onnx_export_of_the_fine_stage_matches_torch(tmp_path):
    """The stride-4 reverse-attention stage (``InfNet(fine=True)``) exports with standard ops and runs the same."""
    torch.manual_seed(4)
    model = _randomize_batch_norm(InfNet(widths=TINY_WIDTHS, ch=8, ra_ch=8, fine=True), seed=5)
    exported = export_onnx(model, tmp_path / "fine.onnx", model_sha256=weights_sha256(model), arch="infnet")
    assert {node.domain for node in onnx.load(exported["path"]).graph.node} <= {"", "ai.onnx"}
    batch = np.random.default_rng(7).standard_normal((2, 1, SIZE, SIZE)).astype(np.float32)
    got, expected = _parity(OnnxRuntimeEngine(exported["path"]), model, batch)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_torch_multiclass(multiclass_build, batch_size):
    model, _, result = multiclass_build
    engine = OnnxRuntimeEngine(result["models"][0]["onnx"])
    batch = np.random.default_rng(10 + batch_size).standard_normal((batch_size, 2, SIZE, SIZE)).astype(np.float32)
    got, expected = _parity(engine, model, batch)
    assert np.abs(got - expected).max() < 1e-4
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    labels_got, labels_expected = got.argmax(axis=1), expected.argmax(axis=1)
    for label in range(3):
        assert (labels_expected == label).any()
        assert _dice(labels_got == label, labels_expected == label) > 0.999


def test_build_engine_exports_onnx_and_says_why_tensorrt_was_skipped(multiclass_build, monkeypatch):
    _, weights, result = multiclass_build
    (model,) = result["models"]
    assert result["tensorrt"]["built"] is False
    assert "TensorRT step skipped" in result["tensorrt"]["skipped_reason"]
    assert "not installed" in result["tensorrt"]["skipped_reason"]
    assert model["onnx_reused"] is False and "engine" not in model
    assert read_metadata(model["onnx"])["activation"] == "softmax"
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    again = build_engine("fp32", 4, result["out_dir"], model_files=[weights])
    assert again["models"][0]["onnx_reused"] is True


def test_build_engine_rejects_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="precision"):
        build_engine("int4", 8, tmp_path, model_files=[])
    with pytest.raises(UsageError, match="max-batch"):
        build_engine("fp16", 0, tmp_path, model_files=[])


def test_select_engine_on_cpu(multiclass_build, monkeypatch):
    _, weights, result = multiclass_build
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr("covfast.engine.runtime.cpu_has_vnni", lambda: False)  # auto: fp32 (int8: test_quantize.py)
    cache = result["out_dir"]
    auto = select_engine("auto", weights, device="cpu", cache_dir=cache)
    assert auto.engine.name == "onnxruntime-cpu"
    assert [kind for kind, _ in auto.skipped] == ["tensorrt", "torch-cuda"]
    assert select_engine("torch", weights, device="cpu", cache_dir=cache).engine.name == "torch-cpu"
    with pytest.raises(UsageError, match="--engine tensorrt"):
        select_engine("tensorrt", weights, device="cpu", cache_dir=cache)
    with pytest.raises(UsageError, match="unknown engine"):
        select_engine("openvino", weights, cache_dir=cache)
    batch = np.zeros((2, 2, SIZE, SIZE), np.float32)
    onnx_probs = select_engine("onnx", weights, device="cpu", cache_dir=cache).engine.run(batch)
    torch_probs = select_engine("torch", weights, device="cpu", cache_dir=cache).engine.run(batch)
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4


KEY = EngineKey(model_sha256="ab" * 32, tensorrt_version="10.13.0", gpu_name="NVIDIA H100 80GB HBM3",
                precision="fp16", min_batch=1, opt_batch=32, max_batch=32, input_shape=(1, SIZE, SIZE))


@pytest.mark.parametrize("field, value", [
    ("model_sha256", "cd" * 32), ("tensorrt_version", "10.14.1"), ("gpu_name", "NVIDIA H200"),
    ("precision", "bf16"), ("min_batch", 2), ("opt_batch", 16), ("max_batch", 64), ("input_shape", (2, SIZE, SIZE)),
])
def test_engine_key_changes_with_every_field(field, value):
    changed = dataclasses.replace(KEY, **{field: value})
    assert changed.digest() != KEY.digest()
    assert changed.file_name("infnet") != KEY.file_name("infnet")
    assert EngineKey.from_dict(changed.to_dict()) == changed


def test_engine_key_is_stable_and_validated():
    assert KEY.digest() == dataclasses.replace(KEY).digest()
    assert KEY.file_name("infnet").startswith("infnet-fp16-b32-")
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(KEY, precision="int8")
    with pytest.raises(ValueError, match="max_batch"):
        dataclasses.replace(KEY, opt_batch=64)


def test_engine_file_round_trip_and_refusals(tmp_path):
    plan = bytes(range(256)) * 4  # stands in for TensorRT's serialized plan
    path = tmp_path / KEY.file_name("infnet")
    trtb.write_engine_file(path, KEY, plan)
    assert trtb.read_engine_key(path) == KEY
    assert trtb.read_engine_file(path, KEY) == plan

    other_gpu = dataclasses.replace(KEY, gpu_name="NVIDIA H200", precision="fp32")
    with pytest.raises(EngineFileError, match="stale") as stale:
        trtb.read_engine_file(path, other_gpu)
    assert "gpu_name" in str(stale.value) and "precision" in str(stale.value)
    assert "model_sha256" not in str(stale.value)

    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(EngineFileError, match="truncated or altered"):
        trtb.read_engine_file(path, KEY)

    foreign = tmp_path / "infnet-foreign.engine"
    foreign.write_bytes(plan)  # a bare TensorRT plan without covfast's header
    with pytest.raises(EngineFileError, match="not a covfast TensorRT engine"):
        trtb.read_engine_file(foreign, KEY)
    found = {p.name: (key, reason) for p, key, reason in trtb.find_engines(tmp_path, "infnet")}
    assert found[path.name][0] == KEY
    assert found[foreign.name][0] is None and "not a covfast" in found[foreign.name][1]


def test_tensorrt_import_guard(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError, match=r"pip install covfast\[trt\]"):
        trtb.import_tensorrt()
    with pytest.raises(TensorRTUnavailableError, match="not installed"):
        trtb.build_plan("missing.onnx", KEY, "image")


def test_ensure_onnx_reexports_a_file_without_the_features_output(tmp_path):
    """An export made before the Inf-Net graph had its ``features`` output (no ``outputs`` metadata) is made again;
    a current one is reused."""
    import onnx

    from covfast.engine.runtime import ensure_onnx

    torch.manual_seed(5)
    config = {"in_ch": 1, "widths": list(TINY_WIDTHS), "ch": 8, "ra_ch": 8}
    weights = tmp_path / "tiny-infnet.safetensors"
    save_model(_randomize_batch_norm(InfNet(widths=TINY_WIDTHS, ch=8, ra_ch=8), seed=6), weights, "infnet", config)
    first = ensure_onnx(weights, tmp_path / "engines")
    assert not first["reused"] and first["metadata"]["outputs"] == "prob,features"
    assert ensure_onnx(weights, tmp_path / "engines")["reused"]
    proto = onnx.load(first["path"])
    kept = [p for p in proto.metadata_props if p.key != "outputs"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, first["path"])
    again = ensure_onnx(weights, tmp_path / "engines")
    assert not again["reused"] and again["metadata"]["outputs"] == "prob,features"


def test_unwritable_engine_cache_falls_back_to_torch_under_auto(multiclass_build, monkeypatch, tmp_path):
    _, weights, _ = multiclass_build
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    chosen = select_engine("auto", weights, device="cpu", cache_dir=blocker / "engines")
    assert chosen.engine.name == "torch-cpu"
    reason = dict(chosen.skipped)["onnx"]
    assert "cannot write the ONNX files" in reason and "COVFAST_ENGINE_DIR" in reason
    with pytest.raises(UsageError, match="--engine onnx: cannot write"):
        select_engine("onnx", weights, device="cpu", cache_dir=blocker / "engines")
