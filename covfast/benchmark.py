"""``covfast benchmark``: the whole pipeline on one input, several times in one process, timed per stage.

One warm-up run (it pays the one-time imports, model loading and any ONNX export) is followed by ``runs`` timed
runs, each reading the input, running every stage and writing all outputs into a temporary folder. The result
records the machine (CPU model or GPU name), library versions, date and the exact command, so that a stored JSON
file says where its numbers come from.
"""

from __future__ import annotations

import datetime
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import covfast
from covfast.info import cpu_name

# Pipeline stages in the order they run, with the report's ``timings_s`` entries each one sums.
STAGES = {
    "read": ("read",),
    "lung_mask": ("lung_mask",),
    "infection": ("infection",),
    "reduction": ("reduction",),
    "severity": ("severity",),
    "distribution": ("distribution",),
    "diagnosis": ("diagnosis",),
    "write": ("write_masks", "preview"),
}


def _versions() -> dict:
    import numpy
    import torch

    versions = {"covfast": covfast.__version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__, "onnxruntime": None}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def _stage_seconds(timings: dict, end_to_end: float) -> dict:
    """Seconds of each :data:`STAGES` entry (0 for a stage that did not run) and ``end_to_end``."""
    seconds = {stage: sum(timings.get(key, 0.0) for key in keys) for stage, keys in STAGES.items()}
    seconds["end_to_end"] = end_to_end
    return seconds


def run_benchmark(
    path: str,
    *,
    runs: int = 3,
    device: str = "auto",
    engine: str = "auto",
    batch_size: int | None = None,
    command: str | None = None,
    precision: str | None = None,
    tta: str | None = None,
    ensemble: bool = True,
) -> dict:
    """Time the whole pipeline on ``path``: one warm-up run, then ``runs`` timed runs.

    Args:
        path: a ``.nii``/``.nii.gz`` file or a DICOM series folder.
        runs: timed runs (at least 1).
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: inference engine of the infection networks (see :func:`covfast.infer`).
        batch_size: slices per network batch; None: 8 on the CPU, 32 on a GPU.
        command: the command line to record (default: this process's ``sys.argv``).
        precision: network precision (see :func:`covfast.infer`).
        tta: test-time augmentation (see :func:`covfast.infer`).
        ensemble: run the U-Net partner beside the Inf-Net when installed (see :func:`covfast.infer`).

    Returns:
        dict with ``input`` (path, shape), ``runs``, ``stages`` (per stage and ``end_to_end``: ``median_s``,
        ``min_s``, ``runs_s``), ``peak_host_rss_mb`` (the process's peak, warm-up included), ``peak_gpu_memory_mb``
        (torch's allocator peak on CUDA, else None), ``device`` (kind and name), ``engine`` (what ran, from the
        report), ``versions``, ``date`` (UTC, ISO 8601) and ``command``.

    Raises:
        UsageError: ``runs`` below 1, or a bad ``device`` / ``engine``.
        CovfastError: the input cannot be read or processed.
    """
    import torch

    from covfast.api import infer
    from covfast.errors import UsageError
    from covfast.pipeline.run import resolve_batch_size, resolve_device

    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    device = resolve_device(device)
    batch_size = resolve_batch_size(batch_size, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    measured = []
    with tempfile.TemporaryDirectory(prefix="covfast-benchmark-") as scratch:
        for run in range(runs + 1):
            start = time.perf_counter()
            result = infer(path, out_dir=Path(scratch) / "out", device=device, engine=engine, batch_size=batch_size,
                           precision=precision, tta=tta, ensemble=ensemble)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = _stage_seconds(result.report["timings_s"], time.perf_counter() - start)
            if run:  # run 0 is the warm-up
                measured.append(seconds)
    report = result.report
    stages = {
        stage: {"median_s": statistics.median(r[stage] for r in measured), "min_s": min(r[stage] for r in measured),
                "runs_s": [r[stage] for r in measured]}
        for stage in (*STAGES, "end_to_end")
    }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "input": {"path": str(path), "shape": report["input"]["shape"], "kind": report["input"]["kind"]},
        "runs": runs,
        "warmup_runs": 1,
        "batch_size": batch_size,
        "stages": stages,
        "peak_host_rss_mb": rss_kb / 1024,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "device": {"kind": device, "name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
                   "torch_threads": torch.get_num_threads()},
        "engine": report["engine"],
        "infection_source": report["infection_source"],
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }


def format_benchmark(result: dict) -> str:
    """The benchmark as a text table: median and min seconds per stage and end to end, then memory and provenance."""
    shape = " x ".join(str(s) for s in result["input"]["shape"])
    engines = ", ".join(f"{name} {used['engine']}" for name, used in result["engine"].items()) or "no network"
    lines = [
        f"covfast benchmark: {result['input']['path']} ({shape}), {result['runs']} runs after 1 warm-up",
        (f"device: {result['device']['kind']} ({result['device']['name']}); engines: {engines}; "
         f"batch {result.get('batch_size', '?')}"),
        "",
        f"{'stage':<12}{'median s':>10}{'min s':>10}",
    ]
    for stage, times in result["stages"].items():
        if stage == "end_to_end":
            lines.append("-" * 32)
        lines.append(f"{stage:<12}{times['median_s']:>10.3f}{times['min_s']:>10.3f}")
    lines.append("")
    lines.append(f"peak host RSS: {result['peak_host_rss_mb']:.0f} MB")
    if result["peak_gpu_memory_mb"] is not None:
        lines.append(f"peak GPU memory (torch allocator): {result['peak_gpu_memory_mb']:.0f} MB")
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v is not None)
    lines.append(f"versions: {versions}; {result['date']}")
    return "\n".join(lines)
