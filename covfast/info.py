"""``covfast info``: version, compiled extensions, backends, devices and installed model weights."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from pathlib import Path

import covfast


def _module_status(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 -- an extension that fails to load must show why, not crash `info`
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"available": True, "version": getattr(module, "__version__", None)}


def _cuda_extension() -> dict:
    status = _module_status("covfast._cuda")
    if status["available"]:
        import covfast._cuda as ext

        status["runtime_version"] = ext.runtime_version()
        status["device_count"] = ext.device_count()
    else:
        status["reason"] = "not built (no nvcc at install time, or COVFAST_CUDA=OFF): " + status["reason"]
    return status


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere), with the usable core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def _devices() -> list[dict]:
    import torch

    devices = [{"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {"type": "cuda", "index": index, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)}
            )
    return devices


def _models() -> list[dict]:
    try:
        from covfast.pipeline.infection import installed_models
    except ImportError as exc:
        return [{"error": f"infection stage unavailable: {exc}"}]
    return installed_models()


def collect_info() -> dict:
    """Everything ``covfast info`` prints, as a dict."""
    import torch

    backends = {
        "cpp": _module_status("covfast._C"),
        "cuda": _cuda_extension(),
        "triton": _module_status("triton")
        if importlib.util.find_spec("triton")
        else {"available": False, "reason": "triton is not installed (pip install 'covfast[gpu]')"},
        "onnxruntime": _module_status("onnxruntime")
        if importlib.util.find_spec("onnxruntime")
        else {"available": False, "reason": "onnxruntime is not installed (pip install 'covfast[onnx]')"},
        "tensorrt": _module_status("tensorrt")
        if importlib.util.find_spec("tensorrt")
        else {"available": False, "reason": "tensorrt is not installed (pip install 'covfast[trt]' on a CUDA machine)"},
        "highdicom": _module_status("highdicom")
        if importlib.util.find_spec("highdicom")
        else {"available": False, "reason": "highdicom is not installed (pip install 'covfast[dicom]'); --dicom-seg "
                                            "needs it"},
    }
    if backends["onnxruntime"]["available"]:
        from covfast.engine.quantize import cpu_has_vnni

        # What `--engine auto` runs on this CPU (see covfast.engine.runtime).
        backends["onnxruntime"]["cpu_default"] = "int8 (VNNI)" if cpu_has_vnni() else "fp32 (no 8-bit dot products)"
    try:
        from covfast import _backend

        ops = {
            name: {"available": ok, "reason": reason} for name, (ok, reason) in _backend.available_backends().items()
        }
        selected = {device: _backend.selected_backends(device) for device in ("cpu", "cuda")}
    except (ImportError, AttributeError) as exc:
        ops, selected = {"error": str(exc)}, {}
    return {
        "covfast": covfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "extensions": {"covfast._C": backends["cpp"], "covfast._cuda": backends["cuda"]},
        "backends": backends,
        "op_backends": ops,
        "op_selection": selected,
        "devices": _devices(),
        "models": _models(),
    }


def format_info(info: dict) -> str:
    """Human-readable text of :func:`collect_info`."""
    lines = [f"covfast {info['covfast']} (python {info['python']}, torch {info['torch']})", "backends:"]
    for name, status in info["backends"].items():
        if status["available"]:
            extra = ", ".join(f"{k} {v}" for k, v in status.items() if k != "available" and v is not None)
            lines.append(f"  {name:<12} yes{(' (' + extra + ')') if extra else ''}")
        else:
            lines.append(f"  {name:<12} no  ({status['reason']})")
    lines.append("devices:")
    for device in info["devices"]:
        desc = ", ".join(f"{k} {v}" for k, v in device.items() if k != "type")
        lines.append(f"  {device['type']:<12} {desc}")
    lines.append("models:")
    if not info["models"]:
        lines.append("  none installed (infection needs --infection-mask until weights ship)")
    for model in info["models"]:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in model.items()))
    lines.append("op backends:")
    for name, status in info["op_backends"].items():
        lines.append(f"  {name:<12} {'yes' if status.get('available') else 'no '} ({status.get('reason', '')})")
    for device, ops in info["op_selection"].items():
        lines.append(f"ops on {device}: " + ", ".join(f"{op}={backend}" for op, backend in ops.items()))
    return "\n".join(lines)
