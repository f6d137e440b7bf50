"""Inference engines for the slice-batch graph, and the choice among them.

Every engine has a ``name`` (recorded in the report) and ``run(batch) -> probabilities`` with
``batch: [N, C, S, S] float32`` standardised slices (S = ``covfast.nn.preprocess.INPUT_SIZE``) and probabilities
``[N, K, S, S] float32``.

``auto`` tries, in order: TensorRT (a cached engine built by ``covfast build-engine`` for this model, TensorRT
version and GPU), torch on CUDA, onnxruntime (CUDA provider when present, else CPU), torch on the CPU. Each engine
passed over is listed with the reason in :attr:`Selection.skipped`.

Precision ``int8`` is onnxruntime on the CPU running the statically quantized graph of :mod:`covfast.engine.quantize`.
``auto`` without a precision picks it on a CPU with 8-bit dot-product instructions (:func:`cpu_has_vnni`): out of
fold on the 50 labelled slices it scored the shipped ensemble's Dice@0.5 0.718 like float32 (paired +0.0004
[-0.0008, +0.0016]; training/RESULTS.md, session 9) at about half the network time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covfast.engine.onnx_export import (
    FEATURES_NAME,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    ProbabilityHead,
    export_onnx,
    read_metadata,
)
from covfast.engine.quantize import cpu_has_vnni, ensure_int8_onnx
from covfast.errors import OutputError, UsageError

ENGINES = ("auto", "torch", "onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
log = logging.getLogger("covfast")
# TensorRT engines are tried in this order when no precision is asked for.
_PRECISION_PREFERENCE = ("fp16", "bf16", "fp32")


def check_engine(kind: str) -> None:
    """Raise :class:`~covfast.errors.UsageError` unless ``kind`` is one of :data:`ENGINES`."""
    if kind not in ENGINES:
        raise UsageError(f"unknown engine {kind!r} (choose one of {', '.join(ENGINES)})")


def check_precision(precision: str | None) -> None:
    """Raise :class:`~covfast.errors.UsageError` unless ``precision`` is None or one of :data:`PRECISIONS`."""
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})")


def default_cache_dir() -> Path:
    """Folder of exported ONNX files and TensorRT engines: ``$COVFAST_ENGINE_DIR`` or ``~/.cache/covfast/engines``."""
    return Path(os.environ.get("COVFAST_ENGINE_DIR") or Path.home() / ".cache" / "covfast" / "engines")


def is_current_export(metadata: dict, model_sha256: str) -> bool:
    """Whether an ONNX file's metadata (:func:`~covfast.engine.onnx_export.read_metadata`) says it was exported from
    the weights with this SHA-256 by this exporter (exports older than the ``outputs`` entry lack the Inf-Net's
    features output and are made again)."""
    return metadata.get("model_sha256") == model_sha256 and metadata.get("opset") == str(OPSET) and \
        "outputs" in metadata


def ensure_onnx(model_file: str | Path, out_dir: str | Path) -> dict:
    """The ONNX export of a covfast weights file in ``out_dir``, reused when it was exported from the same weights.

    Args:
        model_file: covfast ``.safetensors`` weights.
        out_dir: folder of ``<stem>.onnx``.

    Returns:
        dict with ``path``, ``metadata``, ``reused`` (and ``onnx_sha256``, ``seconds`` when exported now).
    """
    from covfast.nn import load_model, read_architecture, sha256_file

    model_file = Path(model_file)
    sha = sha256_file(model_file)
    path = Path(out_dir) / f"{model_file.stem}.onnx"
    if path.exists():
        metadata = read_metadata(path)
        if is_current_export(metadata, sha):
            return {"path": str(path), "metadata": metadata, "reused": True}
    arch, config = read_architecture(model_file)
    log.info("exporting %s to ONNX for onnxruntime (once per weights; kept in %s)", model_file.stem, out_dir)
    exported = export_onnx(load_model(model_file), path, model_sha256=sha, model_name=model_file.stem, arch=arch,
                           config=config)
    return {**exported, "reused": False}


class TorchEngine:
    """The network in torch (covfast's ops dispatch to the fastest backend for the device).

    Args:
        model: a covfast network.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32``, or ``bf16`` / ``fp16`` to run under ``torch.autocast`` (weights stay float32; outputs
            come back as float32).
    """

    def __init__(self, model, device: str, precision: str = "fp32"):
        check_precision(precision)
        if precision == "int8":
            raise UsageError("int8 runs in onnxruntime only (--engine onnx or auto), not in torch")
        self.head = ProbabilityHead(model, features=True).to(device).eval()
        self.device = device
        self.precision = precision
        self.name = f"torch-{device}" + ("" if precision == "fp32" else f"-{precision}")

    def run_with_features(self, batch):
        """batch: [N, C, H, W] tensor -> (probabilities [N, K, H, W] float32, Inf-Net backbone features
        [N, F, H/8, W/8] float32 or None for other networks), on the engine's device (a batch already there is not
        copied)."""
        import torch

        dtype = getattr(torch, _AUTOCAST_DTYPES.get(self.precision, "float32"))
        with torch.inference_mode(), torch.autocast(self.device, dtype=dtype, enabled=self.precision != "fp32"):
            out = self.head(batch.to(device=self.device, dtype=torch.float32))
            prob, features = out if self.head.features else (out, None)
            return prob.float(), None if features is None else features.float()

    def run_tensor(self, batch):
        """batch: [N, C, H, W] tensor -> [N, K, H, W] float32 probabilities on the engine's device."""
        return self.run_with_features(batch)[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """batch: [N, C, H, W] float32 -> [N, K, H, W] float32 probabilities."""
        import torch

        return self.run_tensor(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).cpu().numpy()


class OnnxRuntimeEngine:
    """An ONNX file in onnxruntime, on the CUDA execution provider when available and asked for, else the CPU.

    Args:
        onnx_path: file from :func:`covfast.engine.onnx_export.export_onnx`.
        device: ``cpu`` or ``cuda`` (``cuda`` falls back to the CPU provider when onnxruntime has no CUDA one).
        threads: intra-op threads (0: onnxruntime's default, one per physical core).
        precision: what the file holds, ``fp32`` or ``int8`` (:mod:`covfast.engine.quantize`), shown in ``name``.
    """

    def __init__(self, onnx_path: str | Path, device: str = "cpu", threads: int = 0, precision: str = "fp32"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
        active = self.session.get_providers()[0]
        self.name = ("onnxruntime-cuda" if active == "CUDAExecutionProvider" else "onnxruntime-cpu") + (
            "" if precision == "fp32" else f"-{precision}")
        self.outputs = [OUTPUT_NAME] + [o.name for o in self.session.get_outputs() if o.name == FEATURES_NAME]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """batch: [N, C, H, W] float32 -> [N, K, H, W] float32 probabilities."""
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        return self.session.run([OUTPUT_NAME], feed)[0]

    def run_with_features(self, batch):
        """batch: [N, C, H, W] tensor -> (probabilities, Inf-Net backbone features or None when the graph has no
        ``features`` output), float32 on the batch's device.

        onnxruntime takes host arrays here: a CPU tensor is shared with numpy without a copy, a CUDA one makes a round
        trip through host memory (the TensorRT and torch engines keep CUDA batches on the GPU).
        """
        import torch

        feed = {INPUT_NAME: np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())}
        prob, *features = (torch.from_numpy(out).to(batch.device) for out in self.session.run(self.outputs, feed))
        return prob, (features[0] if features else None)

    def run_tensor(self, batch):
        """batch: [N, C, H, W] tensor -> [N, K, H, W] float32 probabilities on the batch's device."""
        return self.run_with_features(batch)[0]


@dataclass
class Selection:
    """The engine chosen for one model and why the ones before it were passed over.

    Attributes:
        engine: object with ``name`` and ``run``.
        skipped: (engine kind, reason) for each engine tried and not used, in the order tried.
    """

    engine: object
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> dict:
        """JSON-ready summary for the report."""
        return {"engine": self.engine.name, "skipped": [{"engine": k, "reason": r} for k, r in self.skipped]}


def _tensorrt(model_file: Path, cache_dir: Path, precision: str | None, input_shape: tuple[int, int, int]):
    """A :class:`~covfast.engine.tensorrt_builder.TensorRTEngine` for a cached engine that fits this machine."""
    from covfast.engine import tensorrt_builder as trtb
    from covfast.nn import sha256_file

    sha = sha256_file(model_file)
    probe = trtb.current_key(sha, precision or "fp32", 1, input_shape)  # raises when TensorRT or the GPU is missing
    candidates = []
    refused = []
    for path, key, reason in trtb.find_engines(cache_dir, model_file.stem):
        if key is None:
            refused.append(reason)
        elif (key.model_sha256, key.tensorrt_version, key.gpu_name, key.input_shape) != (
                probe.model_sha256, probe.tensorrt_version, probe.gpu_name, probe.input_shape):
            refused.append(f"{path.name}: built for other weights, TensorRT or GPU")
        elif precision is None or key.precision == precision:
            candidates.append((path, key))
    if not candidates:
        wanted = f"{precision} " if precision else ""
        detail = f" ({'; '.join(refused)})" if refused else ""
        raise trtb.TensorRTUnavailableError(
            f"no usable {wanted}TensorRT engine for {model_file.stem} in {cache_dir}{detail}; run `covfast build-engine`")
    path, key = min(candidates, key=lambda c: (_PRECISION_PREFERENCE.index(c[1].precision), -c[1].max_batch))
    return trtb.TensorRTEngine(path, key, INPUT_NAME, OUTPUT_NAME)


def select_engine(
    kind: str,
    model_file: str | Path,
    *,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    precision: str | None = None,
    calibration: tuple[str, Callable[[], np.ndarray]] | None = None,
) -> Selection:
    """Choose and load the engine that runs one covfast model.

    Args:
        kind: ``auto``, ``torch``, ``onnx`` or ``tensorrt``.
        model_file: covfast ``.safetensors`` weights.
        device: ``auto``, ``cpu`` or ``cuda``; ``cpu`` rules out TensorRT and CUDA providers.
        cache_dir: folder of ONNX files and TensorRT engines (default :func:`default_cache_dir`).
        precision: ``fp32``, ``fp16`` or ``bf16``: the TensorRT engine's precision (None: the best cached one, fp16
            before bf16 before fp32), or the autocast precision of the torch engines (None: fp32); onnxruntime runs
            fp32 or ``int8`` (on the CPU), so ``auto`` passes over it when fp16 / bf16 is asked for. None with ``auto``
            and no GPU in use: ``int8`` when :func:`cpu_has_vnni`, else fp32.
        calibration: (key, function returning the calibration inputs) for the int8 graph (default: the sample
            volume's slices, right for single-channel networks; see :func:`covfast.engine.quantize.ensure_int8_onnx`).

    Returns:
        :class:`Selection`.

    Raises:
        UsageError: unknown ``kind`` or ``precision``, or an explicitly requested engine is unavailable (the message
            says why).
    """
    import torch

    from covfast.engine.onnx_export import in_channels
    from covfast.engine.tensorrt_builder import TensorRTUnavailableError
    from covfast.nn import load_model
    from covfast.nn.preprocess import INPUT_SIZE

    check_engine(kind)
    check_precision(precision)
    model_file = Path(model_file)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but torch sees no CUDA GPU")
    if precision == "int8" and kind in ("torch", "tensorrt"):
        raise UsageError(f"--engine {kind} does not run int8; --precision int8 is onnxruntime on the CPU "
                         "(--engine onnx or auto)")
    skipped: list[tuple[str, str]] = []
    model = load_model(model_file)

    if precision == "int8":
        if kind == "auto":
            skipped.append(("tensorrt", "int8 was asked for: onnxruntime on the CPU runs it"))
    elif kind in ("auto", "tensorrt"):
        try:
            if not cuda:
                raise TensorRTUnavailableError("TensorRT needs a CUDA GPU and none is in use")
            return Selection(_tensorrt(model_file, cache_dir, precision, (in_channels(model), INPUT_SIZE, INPUT_SIZE)),
                             skipped)
        except TensorRTUnavailableError as exc:
            if kind == "tensorrt":
                raise UsageError(f"--engine tensorrt: {exc}") from None
            skipped.append(("tensorrt", str(exc)))
    if kind in ("auto", "torch") and cuda and precision != "int8":
        return Selection(TorchEngine(model, "cuda", precision or "fp32"), skipped)
    if kind == "auto":
        skipped.append(("torch-cuda", "int8 was asked for" if cuda else "no CUDA GPU in use"))
    if precision in ("fp16", "bf16") and kind in ("auto", "onnx"):
        if kind == "onnx":
            raise UsageError(f"--engine onnx runs fp32 or int8; --precision {precision} needs --engine torch or "
                             "tensorrt")
        skipped.append(("onnx", f"runs fp32 or int8 and {precision} was asked for"))
    elif kind in ("auto", "onnx"):
        try:
            return Selection(_onnxruntime(kind, model_file, cache_dir, precision, cuda, calibration, skipped,
                                          in_channels(model)), skipped)
        except ImportError as exc:
            if kind == "onnx" or precision == "int8":
                raise UsageError(f"--engine onnx needs onnx and onnxruntime (pip install covfast[onnx]): {exc}") from None
            skipped.append(("onnx", f"onnx/onnxruntime not installed ({exc})"))
        except (OSError, OutputError) as exc:
            problem = exc.problem if isinstance(exc, OutputError) else exc.strerror or exc
            reason = f"cannot write the ONNX files to {cache_dir} ({problem}); set COVFAST_ENGINE_DIR to a writable folder"
            if kind == "onnx" or precision == "int8":
                raise UsageError(f"--engine onnx: {reason}") from None
            log.warning("%s: onnxruntime passed over (torch on the CPU is slower): %s", model_file.stem, reason)
            skipped.append(("onnx", reason))
    return Selection(TorchEngine(model, "cpu", precision or "fp32"), skipped)


def _onnxruntime(kind: str, model_file: Path, cache_dir: Path, precision: str | None, cuda: bool,
                 calibration: tuple[str, Callable[[], np.ndarray]] | None,
                 skipped: list[tuple[str, str]], channels: int) -> OnnxRuntimeEngine:
    """The onnxruntime engine of :func:`select_engine`: int8 on the CPU when asked for, or by default under ``auto``
    without a GPU on a CPU with 8-bit dot products (falling back to fp32, noted in ``skipped``, when quantizing
    fails or a multi-channel network comes without calibration inputs); fp32 otherwise."""
    int8 = precision == "int8" or (precision is None and kind == "auto" and not cuda and cpu_has_vnni())
    if int8:
        try:
            if calibration is None and channels != 1:
                # The default calibration inputs are single-channel slices: the caller knows the other channels.
                raise ValueError(f"no calibration inputs given for a {channels}-channel network")
            made = ensure_int8_onnx(model_file, cache_dir, calibration)
            return OnnxRuntimeEngine(made["path"], "cpu", precision="int8")
        except ImportError:
            raise
        except Exception as exc:  # the quantizer's failures vary by onnxruntime version
            if precision == "int8":
                raise UsageError(f"--precision int8: quantizing {model_file.stem} failed: {exc}") from exc
            skipped.append(("onnx-int8", f"quantizing failed ({type(exc).__name__}: {exc})"))
    return OnnxRuntimeEngine(ensure_onnx(model_file, cache_dir)["path"], "cuda" if cuda else "cpu")
