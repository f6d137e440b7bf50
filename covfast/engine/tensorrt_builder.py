"""TensorRT engine build and cached engine files, behind an import guard.

What was exercised where: TensorRT's libraries cannot be installed on the machines covfast was developed on, so
:func:`build_plan` and :class:`TensorRTEngine` are written against TensorRT 10's documented Python API
(``Builder``, ``OnnxParser.parse_from_file``, ``IOptimizationProfile.set_shape``, ``build_serialized_network``,
``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``) and have not been run. The import guard, the cache key and the engine file format (header,
refusal of stale, foreign and corrupted files) are tested on the CPU in ``tests/test_engine.py``.

An engine file is a covfast header followed by TensorRT's serialized plan::

    b"COVFAST-TRT\\n" | uint32 little-endian header length | header JSON | plan bytes

The header holds the :class:`EngineKey` (model SHA-256, TensorRT version, GPU name, precision, optimisation
profile, input shape) and the plan's SHA-256. A file is used only when its key equals the expected one, so an
engine is rebuilt when any of these change and a stale or foreign file is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from covfast.errors import CovfastError
from covfast.io.atomic import atomic_write

PRECISIONS = ("fp32", "fp16", "bf16")
MAGIC = b"COVFAST-TRT\n"
_LENGTH = struct.Struct("<I")
_WORKSPACE_BYTES = 2 << 30


class TensorRTUnavailableError(CovfastError):
    """TensorRT (or the CUDA GPU it needs) is not available."""


class EngineFileError(CovfastError):
    """An engine file is stale (built for another model, TensorRT, GPU, precision or profile), foreign or corrupt."""


def import_tensorrt():
    """Import and return the ``tensorrt`` module.

    Raises:
        TensorRTUnavailableError: with the install hint and the original import error.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed ({exc}); install NVIDIA's wheels with `pip install covfast[trt]` on a "
            "machine with a CUDA GPU, or use --engine onnx|torch"
        ) from None
    return tensorrt


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT engine depends on; two engines are interchangeable only if their keys are equal.

    Attributes:
        model_sha256: SHA-256 of the model weights the ONNX graph was exported from.
        tensorrt_version: ``tensorrt.__version__`` of the builder.
        gpu_name: CUDA device name (engines are specific to a GPU model).
        precision: ``fp32``, ``fp16`` or ``bf16``.
        min_batch: smallest batch of the optimisation profile.
        opt_batch: batch the kernels are tuned for.
        max_batch: largest batch of the optimisation profile.
        input_shape: (C, H, W) of one slice.
    """

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    input_shape: tuple[int, int, int]

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")

    def to_dict(self) -> dict:
        """JSON-ready fields (``input_shape`` as a list)."""
        fields = dataclasses.asdict(self)
        fields["input_shape"] = list(self.input_shape)
        return fields

    @classmethod
    def from_dict(cls, fields: dict) -> EngineKey:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError on malformed input."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: fields[k] for k in names}, "input_shape": tuple(fields["input_shape"])})

    def digest(self) -> str:
        """Hex SHA-256 of the canonical JSON of the key: the cache's file-name component."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def file_name(self, model_name: str) -> str:
        """``<model>-<precision>-b<max_batch>-<digest[:16]>.engine``."""
        return f"{model_name}-{self.precision}-b{self.max_batch}-{self.digest()[:16]}.engine"


def write_engine_file(path: str | Path, key: EngineKey, plan: bytes) -> None:
    """Write ``plan`` behind a covfast header holding ``key`` and the plan's SHA-256 (atomically)."""
    path = Path(path)
    header = json.dumps({"key": key.to_dict(), "plan_sha256": hashlib.sha256(plan).hexdigest()},
                        sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(file) -> None:
        file.write(MAGIC + _LENGTH.pack(len(header)) + header)
        file.write(plan)

    atomic_write(path, write)


def read_engine_key(path: str | Path) -> EngineKey:
    """Read only the header of an engine file.

    Raises:
        EngineFileError: the file is not a covfast engine file or its header is malformed.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        prefix = fh.read(len(MAGIC) + _LENGTH.size)
        if len(prefix) < len(MAGIC) + _LENGTH.size or not prefix.startswith(MAGIC):
            raise EngineFileError(f"{path}: not a covfast TensorRT engine file (no covfast header); "
                                  "build one with `covfast build-engine`")
        (length,) = _LENGTH.unpack(prefix[len(MAGIC):])
        try:
            return EngineKey.from_dict(json.loads(fh.read(length))["key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineFileError(f"{path}: malformed covfast engine header ({exc})") from None


def read_engine_file(path: str | Path, expected: EngineKey) -> bytes:
    """Return the TensorRT plan of an engine file after checking that it was built for ``expected``.

    Raises:
        EngineFileError: foreign file, stale key (each differing field is named with both values), or a plan whose
            SHA-256 does not match the header (truncated or altered file).
    """
    path = Path(path)
    found = read_engine_key(path)
    if found != expected:
        changes = [f"{name}: file has {getattr(found, name)!r}, need {getattr(expected, name)!r}"
                   for name in (f.name for f in dataclasses.fields(EngineKey))
                   if getattr(found, name) != getattr(expected, name)]
        raise EngineFileError(f"{path}: stale TensorRT engine ({'; '.join(changes)}); "
                              "rebuild it with `covfast build-engine`")
    data = path.read_bytes()
    (length,) = _LENGTH.unpack(data[len(MAGIC):len(MAGIC) + _LENGTH.size])
    start = len(MAGIC) + _LENGTH.size + length
    header = json.loads(data[len(MAGIC) + _LENGTH.size:start])
    plan = data[start:]
    if hashlib.sha256(plan).hexdigest() != header["plan_sha256"]:
        raise EngineFileError(f"{path}: engine plan is truncated or altered (SHA-256 differs from its header); "
                              "rebuild it with `covfast build-engine`")
    return plan


def current_key(model_sha256: str, precision: str, max_batch: int, input_shape: tuple[int, int, int],
                opt_batch: int | None = None) -> EngineKey:
    """The key of an engine built here and now (imports TensorRT and needs a CUDA GPU).

    Raises:
        TensorRTUnavailableError: no TensorRT, or no CUDA GPU.
    """
    import torch

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("TensorRT is installed but torch sees no CUDA GPU to build or run engines on")
    return EngineKey(model_sha256=model_sha256, tensorrt_version=trt.__version__,
                     gpu_name=torch.cuda.get_device_name(), precision=precision, min_batch=1,
                     opt_batch=opt_batch or max_batch, max_batch=max_batch, input_shape=tuple(input_shape))


def build_plan(onnx_path: str | Path, key: EngineKey, input_name: str, output_name: str = "prob") -> bytes:
    """Build a serialized TensorRT engine from an ONNX file with one optimisation profile for ``key``.

    Args:
        onnx_path: ONNX file from :func:`covfast.engine.onnx_export.export_onnx`.
        key: precision and batch profile to build for.
        input_name: name of the graph input the profile applies to.
        output_name: the graph output the engine keeps; others (the Inf-Net's ``features``) are unmarked, so the
            engine computes only what :class:`TensorRTEngine` binds.

    Returns:
        TensorRT's serialized plan.

    Raises:
        TensorRTUnavailableError: no TensorRT.
        RuntimeError: the parser rejects the graph or the build fails.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    for index in reversed(range(network.num_outputs)):
        if network.get_output(index).name != output_name:
            network.unmark_output(network.get_output(index))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
    if key.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif key.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (key.min_batch, *key.input_shape), (key.opt_batch, *key.input_shape),
                      (key.max_batch, *key.input_shape))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(plan)


def find_engines(directory: str | Path, model_name: str) -> list[tuple[Path, EngineKey | None, str | None]]:
    """Engine files of ``model_name`` in ``directory`` with their keys, or None and the reason they are unusable."""
    found = []
    for path in sorted(Path(directory).glob(f"{model_name}-*.engine")):
        try:
            found.append((path, read_engine_key(path), None))
        except EngineFileError as exc:
            found.append((path, None, str(exc)))
    return found


class TensorRTEngine:
    """Run a cached TensorRT engine on CUDA; batches larger than the profile's maximum are split.

    Args:
        path: engine file written by :func:`write_engine_file`.
        expected: the key the file must carry (see :func:`current_key`).
        input_name: graph input name.
        output_name: graph output name.
    """

    def __init__(self, path: str | Path, expected: EngineKey, input_name: str, output_name: str):
        import torch

        trt = import_tensorrt()
        plan = read_engine_file(path, expected)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineFileError(f"{path}: TensorRT could not deserialize the engine; rebuild it")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self.key = expected
        self.input_name, self.output_name = input_name, output_name
        self.name = f"tensorrt-{expected.precision}"

    def run_tensor(self, batch):
        """batch: [N, C, H, W] float32 CUDA tensor -> [N, K, H, W] float32 CUDA probabilities."""
        import torch

        batch = batch.to(device="cuda", dtype=torch.float32).contiguous()
        outputs = []
        for chunk in batch.split(self.key.max_batch):
            self._context.set_input_shape(self.input_name, tuple(chunk.shape))
            out = torch.empty(tuple(self._context.get_tensor_shape(self.output_name)), device="cuda")
            self._context.set_tensor_address(self.input_name, chunk.data_ptr())
            self._context.set_tensor_address(self.output_name, out.data_ptr())
            self._stream.wait_stream(torch.cuda.current_stream())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            torch.cuda.current_stream().wait_stream(self._stream)
            outputs.append(out)
        return torch.cat(outputs)

    def run_with_features(self, batch):
        """(probabilities, None): the engine keeps only the probability output (see :func:`build_plan`)."""
        return self.run_tensor(batch), None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """batch: [N, C, H, W] float32 -> [N, K, H, W] float32 probabilities."""
        import torch

        return self.run_tensor(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).cpu().numpy()
