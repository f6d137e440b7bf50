"""int8 graphs for onnxruntime on the CPU: static quantization of the exported ONNX, calibrated on real CT.

The float32 export of :mod:`covfast.engine.onnx_export` is quantized with onnxruntime's static quantizer in QDQ form:
convolution weights int8 per output channel (symmetric), activations uint8 with ranges measured (min / max) on
calibration batches. onnxruntime then runs the convolutions with integer kernels (VNNI dot products where the CPU has
them), 2-3x faster than float32 on the 2-core development machine.

Calibration batches are inputs the pipeline itself prepares: lung slices of the volume that ships with covfast
(:func:`covfast.io.sample_path`), windowed, cropped and resized as in :mod:`covfast.pipeline.infection`; the
pipeline adds the multi-class network's prior channel. Nothing is downloaded and the result is deterministic.

The int8 file sits beside the float32 export as ``<stem>.int8.onnx`` and records in its metadata the weights'
SHA-256, the calibration's SHA-256 and :data:`QUANT_VERSION`; it is made again when any of these differ.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from covfast.engine.onnx_export import INPUT_NAME, read_metadata
from covfast.io.atomic import atomic_write

# Bump when the quantization settings below change: cached int8 files are then made again.
QUANT_VERSION = "1"
CALIBRATION_SLICES = 32
CALIBRATION_BATCH = 8
log = logging.getLogger("covfast")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    """Text of ``/proc/cpuinfo``, read once per process; None where it does not exist."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has 8-bit dot-product instructions (x86 AVX-512 VNNI / AVX-VNNI / AMX, or Arm dot product).

    Without them onnxruntime's uint8 x int8 kernels are slower and, on AVX2, may saturate intermediate sums.

    Args:
        cpuinfo: text of ``/proc/cpuinfo`` (default: read it; False where it does not exist).
    """
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def sample_calibration_slices(n: int = CALIBRATION_SLICES) -> np.ndarray:
    """``n`` network inputs from the shipped sample volume: its lung slices, evenly spaced from the first to the last,
    prepared as :func:`covfast.pipeline.infection.prepare_batch` prepares any volume's.

    Returns:
        [n, 1, S, S] float32 standardised slices (fewer when the sample has fewer lung slices).
    """
    import torch

    from covfast.io import load_volume, sample_path
    from covfast.pipeline.infection import lung_slices, prepare_batch
    from covfast.pipeline.lung import lung_mask

    volume = load_volume(sample_path())
    views = lung_slices(lung_mask(volume.hu, volume.spacing_mm))
    picks = np.unique(np.linspace(0, len(views) - 1, n).round().astype(int))
    return prepare_batch(torch.from_numpy(np.ascontiguousarray(volume.hu)), [views[i] for i in picks]).numpy()


def calibration_sha256(inputs: np.ndarray) -> str:
    """SHA-256 of the calibration inputs' shape and float32 bytes."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    return hashlib.sha256(repr(inputs.shape).encode() + inputs.tobytes()).hexdigest()


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, inputs: np.ndarray, metadata: dict) -> dict:
    """Quantize a float32 covfast ONNX graph to int8 (QDQ) with activation ranges calibrated on ``inputs``.

    Args:
        fp32_path: file from :func:`covfast.engine.onnx_export.export_onnx`.
        out_path: destination (written atomically).
        inputs: [N, C, S, S] float32 calibration inputs, run in batches of :data:`CALIBRATION_BATCH`.
        metadata: extra ``metadata_props`` to record (the float32 graph's are kept).

    Returns:
        dict with ``path``, ``seconds`` and the ``metadata`` written.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: inputs[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(inputs), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference and graph fusions first (what onnxruntime's quantizer expects); symbolic shapes are not
        # needed, the batch is the only dynamic dimension.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(quantized))
        found = {**read_metadata(fp32_path), **metadata}
        onnx.helper.set_model_props(proto, found)
        atomic_write(out_path, lambda file: file.write(proto.SerializeToString()))
    return {"path": str(out_path), "seconds": time.perf_counter() - start, "metadata": found}


def int8_path(fp32_path: str | Path) -> Path:
    """Where the int8 graph of a float32 export lives: ``<stem>.int8.onnx`` beside it."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")


@functools.lru_cache(maxsize=1)
def sample_calibration_key() -> str:
    """What identifies :func:`sample_calibration_slices`' inputs: the sample volume's SHA-256 and the slice count."""
    from covfast.io import sample_path
    from covfast.nn import sha256_file

    return f"sample-{sha256_file(sample_path())[:16]}-{CALIBRATION_SLICES}"


def ensure_int8_onnx(model_file: str | Path, out_dir: str | Path,
                     calibration: tuple[str, Callable[[], np.ndarray]] | None = None) -> dict:
    """The int8 graph of a covfast weights file in ``out_dir``, reused when it was made from the same weights and
    calibration with this :data:`QUANT_VERSION`.

    Args:
        model_file: covfast ``.safetensors`` weights (exported to float32 ONNX first where needed).
        out_dir: folder of the ONNX files.
        calibration: (key, function returning the [N, C, S, S] float32 calibration inputs); the function is called
            only when the graph is (re)made, the key names its inputs so that a graph calibrated otherwise is made
            again. Default: (:func:`sample_calibration_key`, :func:`sample_calibration_slices`), right for
            single-channel networks.

    Returns:
        dict with ``path``, ``metadata``, ``reused``.
    """
    from covfast.engine.runtime import ensure_onnx, is_current_export
    from covfast.nn import sha256_file

    model_file = Path(model_file)
    key, make_inputs = calibration or (sample_calibration_key(), sample_calibration_slices)
    wanted = {"quantization": f"int8-qdq-v{QUANT_VERSION}", "calibration": key}
    path = int8_path(Path(out_dir) / f"{model_file.stem}.onnx")
    if path.exists():
        # The int8 file carries its float32 export's metadata, so a current one is used without reading that export.
        metadata = read_metadata(path)
        if is_current_export(metadata, sha256_file(model_file)) and all(metadata.get(k) == v for k, v in wanted.items()):
            return {"path": str(path), "metadata": metadata, "reused": True}
    exported = ensure_onnx(model_file, out_dir)
    log.info("quantizing %s to int8 for onnxruntime (once per weights; kept in %s)", model_file.stem, out_dir)
    inputs = make_inputs()
    wanted.update(calibration_sha256=calibration_sha256(inputs), calibration_slices=str(len(inputs)))
    return {**quantize_onnx(exported["path"], path, inputs, wanted), "reused": False}
