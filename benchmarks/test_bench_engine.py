"""pytest-benchmark suite of the inference engines on the slice-batch graph: onnxruntime vs torch, batch 1 and 8.

The network is the single-class Inf-Net at its shipped default size with random weights (timing does not depend on
the weights); slices are ``INPUT_SIZE`` squared. ``extra_info`` holds the per-slice time and the device.
"""

import platform

import numpy as np
import pytest
import torch
from conftest import DEVICE, HAS_CUDA, SMOKE

from covfast.engine import OnnxRuntimeEngine, TorchEngine, export_onnx, weights_sha256
from covfast.nn import InfNet
from covfast.nn.preprocess import INPUT_SIZE

SIZE = 64 if SMOKE else INPUT_SIZE
BATCHES = (1, 2) if SMOKE else (1, 8)
ENGINES = ("torch", "onnxruntime")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    torch.manual_seed(0)
    model = InfNet(widths=(8, 16, 32, 64), ch=8, ra_ch=8) if SMOKE else InfNet()
    model.eval()
    path = tmp_path_factory.mktemp("bench_engine") / "infnet.onnx"
    export_onnx(model, path, model_sha256=weights_sha256(model), model_name="infnet-random", input_size=SIZE)
    return {"torch": TorchEngine(model, DEVICE), "onnxruntime": OnnxRuntimeEngine(path, DEVICE)}


def _device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("engine_kind", ENGINES)
def test_engine_batch(benchmark, engines, engine_kind, batch_size):
    engine = engines[engine_kind]
    batch = np.random.default_rng(batch_size).standard_normal((batch_size, 1, SIZE, SIZE)).astype(np.float32)
    # run() returns host arrays, so every timed call already waits for the device.
    probs = benchmark.pedantic(engine.run, args=(batch,), rounds=2 if SMOKE else 5, warmup_rounds=1, iterations=1)
    assert probs.shape == (batch_size, 1, SIZE, SIZE)
    assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0
    if benchmark.stats is not None:
        benchmark.extra_info.update(engine=engine.name, per_slice_ms=1e3 * benchmark.stats.stats.min / batch_size,
                                    device=_device_name())
