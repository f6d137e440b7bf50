"""int8 onnxruntime graphs (covfast.engine.quantize): quantization of the shipped networks, its cache key, the
engine choice (auto picks int8 on a CPU with 8-bit dot products), refusals, and that masks stay close to float32
on real CT (out of fold the ensemble's Dice did not change: training/RESULTS.md, session 9)."""

import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install covfast[onnx])")

from covfast.engine import build_engine, read_metadata, select_engine
from covfast.engine.quantize import (
    QUANT_VERSION,
    cpu_has_vnni,
    ensure_int8_onnx,
    int8_path,
    sample_calibration_key,
    sample_calibration_slices,
)
from covfast.errors import UsageError
from covfast.pipeline.infection import MULTI_CLASS, PARTNER, SINGLE_CLASS, WEIGHTS_DIR, segment_infection

HAS_WEIGHTS = all((WEIGHTS_DIR / f"{name}.safetensors").exists() for name in (SINGLE_CLASS, PARTNER, MULTI_CLASS))
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped infection weights")


@pytest.fixture
def engine_dir():
    """The test run's engine folder (conftest.py; quantizing the shipped networks takes seconds: done once there)."""
    from covfast.engine import default_cache_dir

    return default_cache_dir()


def test_cpu_has_vnni_reads_the_flags():
    assert cpu_has_vnni("processor : 0\nflags : fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni("flags\t\t: sse avx_vnni\n")
    assert cpu_has_vnni("Features : fp asimd asimddp\n")  # Arm dot product
    assert not cpu_has_vnni("flags : fpu sse avx2 avx512f\n")
    assert not cpu_has_vnni("model name : avx512_vnni in a name is not a flag\n")


def test_calibration_slices_are_real_network_inputs():
    slices = sample_calibration_slices(12)
    assert slices.shape[1:] == (1, 256, 256) and 6 <= len(slices) <= 12 and slices.dtype == np.float32
    assert 0.1 < slices.std() < 10  # standardised slices, not zeros
    assert not np.array_equal(slices[0], slices[-1])


@needs_weights
def test_int8_graph_is_cached_and_made_again_for_other_calibration(engine_dir, tmp_path):
    weights = WEIGHTS_DIR / f"{SINGLE_CLASS}.safetensors"
    first = ensure_int8_onnx(weights, engine_dir)
    assert first["path"] == str(int8_path(engine_dir / f"{SINGLE_CLASS}.onnx"))
    meta = read_metadata(first["path"])
    assert meta["quantization"] == f"int8-qdq-v{QUANT_VERSION}" and meta["calibration"] == sample_calibration_key()
    assert meta["model_name"] == SINGLE_CLASS and len(meta["calibration_sha256"]) == 64
    assert ensure_int8_onnx(weights, engine_dir)["reused"] is True
    import onnx

    ops = {node.op_type for node in onnx.load(first["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    calls = []

    def inputs():
        calls.append(1)
        return sample_calibration_slices(8)

    other = tmp_path / "engines"
    made = ensure_int8_onnx(weights, other, ("eight-slices", inputs))
    assert made["reused"] is False and calls == [1]
    assert ensure_int8_onnx(weights, other, ("eight-slices", inputs))["reused"] is True and calls == [1]
    assert ensure_int8_onnx(weights, other)["reused"] is False  # the default calibration is another one


@needs_weights
def test_int8_masks_stay_close_to_float32_on_real_ct(engine_dir, sample_slab):
    hu, lung = sample_slab
    fp32 = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="onnx", precision="fp32")
    int8 = segment_infection(hu, lung, (2.0, 0.7, 0.7), engine="onnx", precision="int8")
    assert {e["engine"] for e in int8.engines.values()} == {"onnxruntime-cpu-int8"}
    assert {e["engine"] for e in fp32.engines.values()} == {"onnxruntime-cpu"}
    a, b = fp32.prob > 0.5, int8.prob > 0.5
    assert a.sum() > 100  # the sample is a COVID-19 case: real lesions are compared
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    assert np.abs(fp32.prob - int8.prob).max() < 0.5
    assert (fp32.classes == int8.classes).mean() > 0.995
    # The multi-class graph was calibrated with the prior channel the pipeline gives it.
    meta = read_metadata(int8_path(engine_dir / f"{MULTI_CLASS}.onnx"))
    assert "+prior-" in meta["calibration"]


@needs_weights
def test_auto_picks_int8_only_with_dot_product_instructions(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    weights = WEIGHTS_DIR / f"{SINGLE_CLASS}.safetensors"
    monkeypatch.setattr("covfast.engine.runtime.cpu_has_vnni", lambda: True)
    assert select_engine("auto", weights, device="cpu").engine.name == "onnxruntime-cpu-int8"
    assert select_engine("onnx", weights, device="cpu").engine.name == "onnxruntime-cpu"  # explicit onnx: fp32
    monkeypatch.setattr("covfast.engine.runtime.cpu_has_vnni", lambda: False)
    assert select_engine("auto", weights, device="cpu").engine.name == "onnxruntime-cpu"
    assert select_engine("auto", weights, device="cpu", precision="int8").engine.name == "onnxruntime-cpu-int8"


@needs_weights
def test_a_two_channel_network_without_calibration_stays_fp32_under_auto(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr("covfast.engine.runtime.cpu_has_vnni", lambda: True)
    weights = WEIGHTS_DIR / f"{MULTI_CLASS}.safetensors"
    chosen = select_engine("auto", weights, device="cpu")
    assert chosen.engine.name == "onnxruntime-cpu"
    assert any(kind == "onnx-int8" and "2-channel" in reason for kind, reason in chosen.skipped)
    with pytest.raises(UsageError, match="--precision int8"):
        select_engine("onnx", weights, device="cpu", precision="int8")


@needs_weights
@pytest.mark.parametrize("kind", ["torch", "tensorrt"])
def test_int8_is_refused_outside_onnxruntime(kind):
    with pytest.raises(UsageError, match="does not run int8"):
        select_engine(kind, WEIGHTS_DIR / f"{SINGLE_CLASS}.safetensors", device="cpu", precision="int8")


@needs_weights
def test_build_engine_int8_quantizes_every_shipped_model(engine_dir):
    result = build_engine("int8", 8, engine_dir)
    names = [model["name"] for model in result["models"]]
    assert {SINGLE_CLASS, PARTNER, MULTI_CLASS} <= set(names)
    assert "affinity" not in names  # the diagnosis head has no slice-batch graph (it used to crash build-engine)
    for model in result["models"]:
        assert model["int8_onnx"].endswith(".int8.onnx") and "engine" not in model
    assert result["tensorrt"]["built"] is False and "int8" in result["tensorrt"]["skipped_reason"]
