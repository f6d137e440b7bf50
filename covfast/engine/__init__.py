"""Inference engines: ONNX export of the slice-batch graph, onnxruntime, TensorRT (behind an import guard) and the
``auto`` choice among them and torch. See :mod:`covfast.engine.runtime` for the order.
"""

from covfast.engine.build import build_engine, shipped_model_files
from covfast.engine.onnx_export import ProbabilityHead, export_onnx, read_metadata, weights_sha256
from covfast.engine.runtime import ENGINES, OnnxRuntimeEngine, Selection, TorchEngine, default_cache_dir, select_engine
from covfast.engine.tensorrt_builder import EngineFileError, EngineKey, TensorRTUnavailableError

__all__ = [
    "ENGINES",
    "EngineFileError",
    "EngineKey",
    "OnnxRuntimeEngine",
    "ProbabilityHead",
    "Selection",
    "TensorRTUnavailableError",
    "TorchEngine",
    "build_engine",
    "default_cache_dir",
    "export_onnx",
    "read_metadata",
    "select_engine",
    "shipped_model_files",
    "weights_sha256",
]
