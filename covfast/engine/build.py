"""``covfast build-engine``: export the shipped models to ONNX, then build TensorRT engines where TensorRT runs."""

from __future__ import annotations

import time
from pathlib import Path

from covfast.engine import tensorrt_builder as trtb
from covfast.engine.onnx_export import INPUT_NAME
from covfast.engine.runtime import default_cache_dir, ensure_onnx
from covfast.errors import ModelNotInstalledError, UsageError


def shipped_model_files() -> list[Path]:
    """The installed segmentation networks' weights with a model card (``covfast/weights``), as the infection stage
    finds them: the slice-batch graphs engines are built for (the diagnosis head runs in torch on their features)."""
    from covfast.pipeline.infection import installed_models

    return [Path(card["file"]) for card in installed_models() if card["task"] in ("infection", "multiclass")]


def _has_key(path: Path, key: trtb.EngineKey) -> bool:
    """Whether the engine file at ``path`` carries ``key`` (a foreign or malformed file does not: it is rebuilt)."""
    try:
        return trtb.read_engine_key(path) == key
    except trtb.EngineFileError:
        return False


def build_engine(precision: str = "fp16", max_batch: int = 32, out_dir: str | Path | None = None, *,
                 model_files: list[str | Path] | None = None) -> dict:
    """Export each model to ONNX and, when TensorRT and a CUDA GPU are available, build and cache its engine.

    ONNX files are reused when they were exported from the same weights; an engine is reused when a file with its
    exact key (see :class:`~covfast.engine.tensorrt_builder.EngineKey`) exists, and rebuilt otherwise.

    With ``precision="int8"`` no TensorRT engine is built: each ONNX graph is quantized for onnxruntime on the CPU
    instead (:mod:`covfast.engine.quantize`, the files ``covfast infer --precision int8`` uses).

    Args:
        precision: TensorRT precision, ``fp32``, ``fp16`` or ``bf16`` (the ONNX graph is always float32), or
            ``int8``.
        max_batch: largest batch of the optimisation profile (tuned for this batch; smallest 1).
        out_dir: folder for the ONNX files and engines (default :func:`~covfast.engine.runtime.default_cache_dir`,
            where ``covfast infer --engine auto`` looks).
        model_files: weights to export (default: :func:`shipped_model_files`).

    Returns:
        dict with ``out_dir``, ``precision``, ``max_batch``, ``models`` (per model: ``name``, ``onnx`` path,
        ``onnx_reused``, ``model_sha256``, ``int8_onnx`` with ``int8_reused`` for int8, and ``engine`` path with
        ``engine_reused`` when built) and ``tensorrt``:
        ``{"built": bool, "skipped_reason": str | None, "version": str | None, "gpu": str | None}``.

    Raises:
        UsageError: bad ``precision`` or ``max_batch``.
        ModelNotInstalledError: no model weights to export.
    """
    if precision not in (*trtb.PRECISIONS, "int8"):
        raise UsageError(f"--precision must be one of {', '.join(trtb.PRECISIONS)}, int8, got {precision!r}")
    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
    files = [Path(f) for f in model_files] if model_files is not None else shipped_model_files()
    if not files:
        from covfast.pipeline.infection import WEIGHTS_DIR

        raise ModelNotInstalledError(f"no model weights with a model card in {WEIGHTS_DIR} to build engines from")
    out_dir = Path(out_dir) if out_dir is not None else default_cache_dir()
    models = []
    for model_file in files:
        exported = ensure_onnx(model_file, out_dir)
        meta = exported["metadata"]
        models.append({"name": model_file.stem, "model_sha256": meta["model_sha256"], "onnx": exported["path"],
                       "onnx_reused": exported["reused"], "input_shape": meta["input_shape"]})
    result = {"out_dir": str(out_dir), "precision": precision, "max_batch": max_batch, "models": models,
              "tensorrt": {"built": False, "skipped_reason": None, "version": None, "gpu": None}}
    if precision == "int8":
        _quantize(models, files, out_dir)
        result["tensorrt"]["skipped_reason"] = "int8 is onnxruntime on the CPU; TensorRT engines are fp32, fp16 or bf16"
        return result
    for model in models:
        input_shape = tuple(int(s) for s in model["input_shape"].split(",")[1:])
        try:
            key = trtb.current_key(model["model_sha256"], precision, max_batch, input_shape)
        except trtb.TensorRTUnavailableError as exc:
            result["tensorrt"]["skipped_reason"] = f"TensorRT step skipped: {exc}"
            break
        path = out_dir / key.file_name(model["name"])
        reused = path.exists() and _has_key(path, key)
        if not reused:
            start = time.perf_counter()
            trtb.write_engine_file(path, key, trtb.build_plan(model["onnx"], key, INPUT_NAME))
            model["engine_build_s"] = time.perf_counter() - start
        model.update(engine=str(path), engine_reused=reused)
        result["tensorrt"].update(built=True, version=key.tensorrt_version, gpu=key.gpu_name)
    return result


def _quantize(models: list[dict], files: list[Path], out_dir: Path) -> None:
    """Add each model's int8 graph (made or reused) to its entry of :func:`build_engine`'s result."""
    from covfast.engine.quantize import ensure_int8_onnx
    from covfast.pipeline.infection import int8_calibration

    for model, model_file in zip(models, files, strict=True):
        made = ensure_int8_onnx(model_file, out_dir, int8_calibration(model["name"], model_file.parent, out_dir))
        model.update(int8_onnx=made["path"], int8_reused=made["reused"])
